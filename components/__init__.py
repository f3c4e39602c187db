"""KFP v2 components: one thin lightweight component per DeMix stage, each calling one demix step."""

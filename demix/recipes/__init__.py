"""Recipes: compositions of stages into whole jobs (`demix run`, `reproduce`, `reproduce-decision`).

A recipe only composes: it calls stage functions (demix.stages) in order with the folders of one
run, times them and writes the run's outputs; it holds no stage logic of its own.
"""

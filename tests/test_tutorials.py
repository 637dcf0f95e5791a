"""Tests of tutorials/: every tutorial runs as a script and its exercises grade both ways;
make_assignments.py writes the student notebooks.

Cost: each tutorial runs once. `make_assignments.py --verify` executes the tutorial as its script (its
cells in order in one `__main__` namespace; `test_verify_runs_the_script` shows the output is the plain
run's), and at each exercise it replays that exercise's few cells in a copy of the namespace with the
solution stubbed. So the student version of every exercise is checked without a second run of the tutorial.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tutorials"))
import make_assignments as MA

TUTORIALS = MA.tutorials(ROOT / "tutorials")
PNG = b"\x89PNG\r\n\x1a\n"


def run(args: list, timeout: float, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def verify(path: Path, tmp_path: Path, timeout: float = 1200) -> tuple:
    report_file = tmp_path / f"{path.stem}.json"
    r = run([ROOT / "tutorials/make_assignments.py", "--verify", path, "--json", report_file], timeout)
    report = json.loads(report_file.read_text()) if report_file.exists() else None
    return r, report


# ----------------------------------------------------------------------------------------------
# Every tutorial: runs, ends with a figure, and each exercise's check fails stubbed and passes solved
# ----------------------------------------------------------------------------------------------
def test_there_are_tutorials():
    assert len(TUTORIALS) >= 2, TUTORIALS


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial(path, tmp_path):
    r, report = verify(path, tmp_path)
    assert r.returncode == 0 and report is not None and report["ok"], \
        f"{path.name} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}\nproblems: {report and report['problems']}"
    assert len({ex["id"] for ex in report["exercises"]}) >= 2
    for ex in report["exercises"]:
        assert ex["stubbed_check_raised"] and ex["caused_by_stub"], ex     # the student version fails ...
        assert ex["check_passed"] is True, ex                               # ... and the shipped one passes
    last = Path(report["figures"][-1]["path"])
    assert last.read_bytes()[:8] == PNG and last.stat().st_size > 5000, last
    print(f"{path.name}: {report['seconds']} s, {len(report['exercises'])} checks, {len(report['figures'])} figures")


# ----------------------------------------------------------------------------------------------
# make_assignments.py: the student notebooks
# ----------------------------------------------------------------------------------------------
def _nb_code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


@pytest.mark.parametrize("solutions", [False, True], ids=["student", "instructor"])
def test_make_assignments_writes_the_notebooks(tmp_path, solutions):
    nbformat = pytest.importorskip("nbformat")
    out = tmp_path / "course"
    r = run([ROOT / "tutorials/make_assignments.py", out] + (["--solutions"] if solutions else []), timeout=300)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.glob("*.ipynb")) == [p.stem + ".ipynb" for p in TUTORIALS]
    for path in TUTORIALS:
        nb = nbformat.read(out / (path.stem + ".ipynb"), as_version=4)
        nbformat.validate(nb)
        shipped = [c for c in MA.split_cells(path.read_text(encoding="utf-8")) if c.kind == "code"]
        cells = _nb_code_cells(nb)
        assert len(cells) == len(shipped), path.name
        n_solutions = n_checks = 0
        for mine, cell in zip(shipped, cells):
            where = f"{path.name}:{mine.first_line}"
            grader = cell.metadata.get("nbgrader")
            if mine.solution:
                n_solutions += 1
                expect = mine.source if solutions else MA.stub_solutions(mine.source)[0]
                assert cell.source.strip() == expect.strip(), where
                if not solutions:
                    assert MA.BEGIN not in cell.source and MA.END not in cell.source, where
                    assert "raise NotImplementedError()" in cell.source and "# YOUR CODE HERE" in cell.source
                assert grader["solution"] and not grader["grade"] and not grader["locked"], where
            else:
                assert cell.source.strip() == mine.source.strip(), f"{where}: a non-solution cell changed"
            if mine.check:
                n_checks += 1
                assert "check" in cell.metadata["tags"] and grader["grade"] and grader["locked"], where
                assert grader["points"] == 1
        assert n_solutions >= 2 and n_checks >= 2, path.name
        ids = [c.metadata["nbgrader"]["grade_id"] for c in nb.cells if "nbgrader" in c.metadata]
        assert len(ids) == len(set(ids)), f"{path.name}: nbgrader grade ids must be unique: {ids}"


def test_stub_keeps_the_indentation_and_everything_outside():
    src = textwrap.dedent('''\
        def f(x):
            """doc"""
            y = 1
            ### BEGIN SOLUTION
            z = x * 2
            if z:
                return z
            ### END SOLUTION
            return y
        ### BEGIN SOLUTION
        g = 3
        ### END SOLUTION
        print(g)
        ''')
    out, n = MA.stub_solutions(src)
    assert n == 2
    assert out == textwrap.dedent('''\
        def f(x):
            """doc"""
            y = 1
            # YOUR CODE HERE
            raise NotImplementedError()
            return y
        # YOUR CODE HERE
        raise NotImplementedError()
        print(g)
        ''')
    compile(out, "<stub>", "exec")


@pytest.mark.parametrize("src, message", [
    ("### BEGIN SOLUTION\nx = 1\n", "has no"),
    ("x = 1\n### END SOLUTION\n", "without"),
    ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION\n", "inside"),
])
def test_stub_rejects_unpaired_markers(src, message):
    with pytest.raises(ValueError, match=message):
        MA.stub_solutions(src, "toy.py")


def test_cells_make_up_the_whole_file():
    for path in TUTORIALS:
        text = path.read_text(encoding="utf-8")
        cells = MA.split_cells(text)
        lines = text.splitlines(keepends=True)
        for c in cells:
            n = len(c.source.splitlines())
            assert "".join(lines[c.first_line - 1:c.first_line - 1 + n]) == c.source, f"{path.name}:{c.first_line}"


# ----------------------------------------------------------------------------------------------
# The verifier itself: it must be able to fail (toy tutorials, a second each)
# ----------------------------------------------------------------------------------------------
TOY = '''\
# %% [markdown]
# # A toy tutorial
# %%
import random
from pathlib import Path
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
OUT = Path(__file__).resolve().parent / "out"
OUT.mkdir(exist_ok=True)
np.random.seed(0)
random.seed(0)
print("first draw", np.random.rand(), random.random())

# %% [markdown]
# ### Exercise 1.1: square
# %%
def square(x):
    ### BEGIN SOLUTION
    return x * x
    ### END SOLUTION

# %% tags=["check"]
assert square(3) == 9 and square(-2) == 4

# %% [markdown]
# ### Exercise 1.2: a top-level solution, two check cells
# %%
print("summing")
### BEGIN SOLUTION
total = sum(range(5))
print("the sum is", total, np.random.rand())
### END SOLUTION

# %% tags=["check"]
assert total == 10

# %% tags=["check"]
assert total * 2 == 20

# %%
print("second draw", np.random.rand(), random.random())
fig, ax = plt.subplots()
ax.plot([0, 1], [total, square(2)])
fig.savefig(OUT / "end.png")
'''


def toy(tmp_path: Path, text: str = TOY, name: str = "01_toy.py") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_verify_passes_a_good_tutorial(tmp_path):
    r, report = verify(toy(tmp_path), tmp_path, timeout=120)
    assert r.returncode == 0 and report["ok"], r.stdout + r.stderr
    got = [(ex["id"], ex["stubbed_check_raised"], ex["caused_by_stub"], ex["check_passed"])
           for ex in report["exercises"]]
    assert got == [("ex_1_1", "NotImplementedError", True, True), ("ex_1_2", "NameError", True, True),
                   ("ex_1_2", "NameError", True, True)]
    assert report["figures"][-1]["path"].endswith("end.png")


def test_verify_runs_the_script(tmp_path):
    """The verifier's run prints what `python toy.py` prints: the stubbed replays disturb neither the
    namespace nor the random number generators."""
    path = toy(tmp_path)
    plain = run([path], timeout=120)
    r, _ = verify(path, tmp_path, timeout=120)
    assert plain.returncode == 0 and plain.stdout.strip()
    assert "summing" in plain.stdout and "the sum is" in plain.stdout
    assert r.stdout.startswith(plain.stdout) and r.stdout.count("summing") == 1, (plain.stdout, r.stdout)


@pytest.mark.parametrize("change, problem", [
    (("assert total * 2 == 20", "assert 2 * 2 == 4"), "passes with its solution stubbed"),      # checks nothing
    (("return x * x", "return x + x"), "raised AssertionError"),                                # a wrong solution
    (("fig.savefig(OUT / \"end.png\")", "plt.close(fig)"), "saves no figure"),                 # no final figure
    (('# %% tags=["check"]\nassert total == 10\n\n# %% tags=["check"]\nassert total * 2 == 20\n', ""),
     "no check cell after it"),                                                                 # an unchecked solution
])
def test_verify_fails_a_broken_tutorial(tmp_path, change, problem):
    old, new = change
    assert old in TOY
    r, report = verify(toy(tmp_path, TOY.replace(old, new)), tmp_path, timeout=120)
    assert r.returncode == 1 and not report["ok"]
    assert any(problem in p for p in report["problems"]), report["problems"]


def test_a_failure_is_the_stubs_when_its_chain_holds_a_not_implemented_error():
    def fails(handler):
        try:
            try:
                raise NotImplementedError()
            except NotImplementedError:
                handler()
        except Exception as exc:  # noqa: BLE001
            return exc
    assert MA._caused_by_stub(NotImplementedError())
    assert MA._caused_by_stub(fails(lambda: 1 / 0))                   # raised while handling the stub's error
    assert not MA._caused_by_stub(AssertionError("wrong"))
    assert not MA._caused_by_stub(fails(lambda: None) or ZeroDivisionError())


def test_verify_wants_two_exercises(tmp_path):
    one = TOY[:TOY.index("# %% [markdown]\n# ### Exercise 1.2")] + TOY[TOY.index("# %%\nprint(\"second draw\""):]
    one = one.replace("[total, square(2)]", "[0, square(2)]")
    r, report = verify(toy(tmp_path, one), tmp_path, timeout=120)
    assert r.returncode == 1 and any("at least two" in p for p in report["problems"]), report["problems"]


def test_nbgrader_grades_a_right_answer_full_and_a_wrong_one_zero():
    """docs/teaching.md's course path with the real nbgrader: make_assignments.py --solutions into an nbgrader
    course's source/, `nbgrader generate_assignment`, a student who solves exercise 5.1 (the instructor's
    solution), answers 5.3 wrongly and leaves 5.2 alone, then `nbgrader autograde`: 1, 0 and 0 points."""
    pytest.importorskip("nbgrader", reason="nbgrader comes with requirements-course.txt")
    import re
    import shutil
    from nbgrader.api import Gradebook
    course = ROOT / "runs" / f"nbgrader_test_{os.getpid()}" / "course"   # inside the repository: the notebooks
    try:                                                                  # find the project's modules upwards
        (course / "source" / "t05").mkdir(parents=True)
        r = run([ROOT / "tutorials/make_assignments.py", course.parent / "instructor", "--solutions"], timeout=300)
        assert r.returncode == 0, r.stderr
        name = "05_sinkhorn_multi_assignment.ipynb"
        shutil.copy(course.parent / "instructor" / name, course / "source" / "t05" / name)
        (course / "nbgrader_config.py").write_text("c = get_config()\nc.CourseDirectory.root = '.'\n"
                                                   "c.ExecutePreprocessor.timeout = 600\n")
        nbgrader = [shutil.which("nbgrader") or "nbgrader"]
        sub = subprocess.run([*nbgrader, "generate_assignment", "t05", "--force"], cwd=course, capture_output=True,
                             text=True, timeout=300)
        assert sub.returncode == 0, sub.stderr[-2000:]
        student = json.loads((course / "release" / "t05" / name).read_text())
        teacher = json.loads((course / "source" / "t05" / name).read_text())
        solution = {c["metadata"]["nbgrader"]["grade_id"]: "".join(c["source"]) for c in teacher["cells"]
                    if c["metadata"].get("nbgrader", {}).get("solution")}
        stubs = 0
        for cell in student["cells"]:
            grade_id = cell["metadata"].get("nbgrader", {}).get("grade_id")
            stubs += "raise NotImplementedError()" in "".join(cell["source"])
            if grade_id == "ex_5_1_solution":
                cell["source"] = solution[grade_id]
            elif grade_id == "ex_5_3_solution":          # a cost that ignores its inputs
                cell["source"] = re.sub(r"# YOUR CODE HERE\n\s*raise NotImplementedError\(\)", "return P.sum() * 0 + 1.0",
                                        "".join(cell["source"]))
        assert stubs == 3                                 # the release holds every exercise unsolved
        (course / "submitted" / "alice" / "t05").mkdir(parents=True)
        (course / "submitted" / "alice" / "t05" / name).write_text(json.dumps(student))
        sub = subprocess.run([*nbgrader, "autograde", "t05", "--force"], cwd=course, capture_output=True, text=True,
                             timeout=600, env={**os.environ, "MPLBACKEND": "Agg"})
        assert sub.returncode == 0, sub.stderr[-2000:]
        with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
            graded = gb.find_submission_notebook(name[:-6], "t05", "alice")
            scores = {g.name: (g.score, g.max_score) for g in graded.grades}
        assert scores == {"ex_5_1_check": (1.0, 1.0), "ex_5_2_check": (0.0, 1.0), "ex_5_3_check": (0.0, 1.0)}
    finally:
        shutil.rmtree(course.parent, ignore_errors=True)

"""
Every command line of the folder, fuzzed (bench.py, bench.py suite, metatest.py, findings.py,
datasets.py; train.py's flags are test_gpicl.py's): a bad value for any flag is refused in one
line, exit 2 (1 for a fault at run time), never a traceback, and before any expensive work.
"""
import argparse
import json
import os
import signal
import string
import traceback

import numpy as np
import pytest
import torch

import bench
import data
import datasets
import findings
import metatest
import models
from conftest import BENCH_TINY, blobs, tiny_checkpoint, write_csv


class ReachedWork(Exception):
    """Raised where a command's expensive work would start: its command line was accepted."""


def reach_work(*args, **kwargs):
    raise ReachedWork


class MakesAFile:
    """Unpickled, this calls open(path, "w"): a file appears if loading a pickle runs its code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


NUMBERS = ["-1", "0", "-0", "1.5", "nan", "inf", "-inf", "1e400", "1e308", "-1e-320", "", " ", "abc",
           "0x10", "2**70", "1_0", "\0", "\u0663", str(2 ** 31), str(2 ** 63), str(10 ** 40)]


TEXTS = ["", " ", "\0", "-1", "nan", "x" * 1000, "\u00e9", "cuda:99", "../..", "/"]


# flags (by dest) that name files: which kind of path each takes
PATH_KINDS = {"ckpt": "in", "ckpts": "in", "train": "in", "test": "in", "out": "out",
              "out_dir": "dir", "data_dir": "dir", "run_dir": "dir"}


def bad_paths(tmp_path, rng):
    """Paths no flag of their kind may take: files to read, files to write, folders to write in."""
    d = tmp_path / "paths"
    d.mkdir()
    (d / "a_folder").mkdir()
    (d / "a_file").write_text("x\n")
    (d / "empty").write_bytes(b"")
    (d / "garbage").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (d / "cut.pt").write_bytes(open(tiny_checkpoint(d / "tiny.pt", width=8, n_layer=1, n_head=2),
                                    "rb").read()[:3000])
    torch.save({"model": MakesAFile(str(tmp_path / "pickle_ran"))}, d / "evil.pt")
    (d / "locked").write_bytes(b"x")
    os.chmod(d / "locked", 0)                           # unreadable, unless the tests run as root
    unusable = ["", "\0", "a\0b", str(d / "a_file" / "x"), str(d / ("x" * 300))]
    return {"in": unusable + [str(d / n) for n in ("missing", "a_folder", "empty", "garbage",
                                                   "cut.pt", "evil.pt", "locked")] + ["/dev/null"],
            "out": unusable + [str(d / "a_folder")], "dir": unusable + [str(d / "a_file")]}


def fuzz_values(action, rng, paths, path_kinds):
    """[(value, refused by definition)] for one flag or positional: fixed bad values and seeded
    random ones. A value is refused by definition when the flag's own type or choices refuse it,
    or when it names a path the flag cannot use; others (--members 10**9) may run, never crash."""
    if action.dest in path_kinds:
        return [(p, True) for p in paths[path_kinds[action.dest]]]
    chars = list(string.printable + "\u00e9\u00df\u221e\u200b")
    randoms = [str(-int(rng.integers(1, 10))),                          # negative
               str(int(rng.choice([-1, 1])) * 2 ** int(rng.integers(31, 130))),  # beyond any size
               f"{rng.normal():.3f}e{int(rng.integers(-400, 400))}",    # tiny, huge, or inf
               "".join(rng.choice(chars, int(rng.integers(0, 12))))]    # garbage
    values = (NUMBERS if action.type else TEXTS) + randoms

    def refused(v):
        if action.choices is not None:
            return v not in action.choices
        try:
            action.type and action.type(v)
            return False
        except (argparse.ArgumentTypeError, TypeError, ValueError):
            return True
    return [(v, refused(v)) for v in values]


def subparsers(parser):
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def fuzz_targets(tmp_path):
    """[(name, main, the parser whose flags are fuzzed, flags at the 'start' or 'end' of argv, a
    valid argv, {positional: its index in it}, the expensive work to stub, path kinds)]"""
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt", width=8, n_layer=1, n_head=2)
    X, y = blobs(["a", "b"], 10, d=3)
    rows = [[*map(str, x), lab] for x, lab in zip(X, y)]
    context = write_csv(tmp_path / "context.csv", ["f1", "f2", "f3", "label"], rows[:12])
    queries = write_csv(tmp_path / "queries.csv", ["f1", "f2", "f3", "label"], rows[12:])
    csv_argv = ["csv", "--ckpt", ckpt, "--train", context, "--test", queries, "--label", "label",
                "--out", str(tmp_path / "preds.csv"), "--members", "1"]
    run_dir = tmp_path / "a_run"
    run_dir.mkdir()
    (run_dir / "log.jsonl").write_text(json.dumps(dict(step=1, loss=2.3)) + "\n")
    mt = metatest.get_parser()
    return [
        ("bench.py", bench.main, bench.get_parser(), "end",
         [*BENCH_TINY, "--out", str(tmp_path / "bench.json")], {}, [(data, "load_dataset")],
         PATH_KINDS),
        ("bench.py suite", bench.suite, bench.suite_parser(), "end",
         ["--out", str(tmp_path / "suite"), "--dry-run"], {}, [(bench, "run_stages")],
         dict(PATH_KINDS, out="dir")),                                  # the suite's is a folder
        ("metatest.py", metatest.main, mt, "start", csv_argv, {"command": 0}, [], PATH_KINDS),
        ("metatest.py csv", metatest.main, subparsers(mt)["csv"], "end", csv_argv, {}, [],
         PATH_KINDS),                                                   # cheap: runs
        ("metatest.py uci", metatest.main, subparsers(mt)["uci"], "end",
         ["uci", "--ckpt", ckpt, "--splits", "1", "--members", "1", "--context", "5", "--queries", "5"],
         {}, [(metatest, "compare_on_uci_digits")], PATH_KINDS),
        ("metatest.py paired", metatest.main, subparsers(mt)["paired"], "end",
         ["paired", "--ckpt", ckpt, "--tasks", "1", "--seqs", "1", "--out",
          str(tmp_path / "paired.json")], {}, [(metatest, "compare_paired")], PATH_KINDS),
        ("metatest.py table1", metatest.main, subparsers(mt)["table1"], "end",
         ["table1", ckpt, "--tasks", "1", "--seqs", "1", "--out-dir", str(tmp_path / "t1")],
         {"ckpts": 1}, [(metatest, "table1")], PATH_KINDS),
        ("findings.py", findings.main, findings.get_parser(), "end",
         ["transitions", "--out", str(tmp_path / "exp.jsonl")], {"name": 0}, [(findings, "run_all")],
         PATH_KINDS),
        ("findings.py run", findings.main, findings.run_parser(), "end",
         ["run", str(run_dir), "--out", str(tmp_path / "curves.png")], {"run_dir": 1},
         [(findings, "plot_run")], PATH_KINDS),
        ("datasets.py", datasets.main, datasets.get_parser(), "end",
         ["fetch", "svhn", "--data-dir", str(tmp_path / "cache")], {"command": 0, "names": 1},
         [(datasets, "fetch")], PATH_KINDS),                             # the network
    ]


class TookTooLong(BaseException):  # not an Exception: no `except Exception` swallows it
    pass


def run_case(main, argv, capsys, seconds=20):
    """main(argv) in this process -> (its exit status, "work", "done", a traceback, or that it
    hangs: say a count refused nowhere, so a loop runs for ever; its stderr)."""
    def too_long(signum, frame):
        raise TookTooLong
    threads, old = torch.get_num_threads(), signal.signal(signal.SIGALRM, too_long)
    signal.alarm(seconds)
    try:
        main(argv)
        outcome = "done"
    except ReachedWork:
        outcome = "work"
    except SystemExit as e:
        outcome = e.code
    except TookTooLong:
        outcome = f"still running after {seconds} s"
    except Exception:
        outcome = traceback.format_exc()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        torch.set_num_threads(threads)                                    # --threads sets it
    return outcome, capsys.readouterr().err


def test_fuzz_every_flag_of_every_command_one_line_never_a_traceback(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    paths, targets = bad_paths(tmp_path, rng), fuzz_targets(tmp_path)
    for module, name in [stub for t in targets for stub in t[6]]:
        monkeypatch.setattr(module, name, reach_work)
    bench.mnist_train.cache_clear()  # loaded by an earlier test, it would not reach the stub
    cases, problems = 0, []
    for name, main, parser, where, base, positions, stubs, path_kinds in targets:
        outcome, err = run_case(main, base, capsys)
        # the valid line is accepted, and stops where its expensive work starts (where there is
        # some): a bad value that reached that point unrefused would have done the work
        assert outcome == ("work" if stubs else "done"), (name, base, outcome, err)
        for action in parser._actions:  # every flag it has, today's and tomorrow's
            if action.nargs == 0:                                         # --help, --dry-run, ...
                continue
            assert action.option_strings or action.dest in positions, f"fuzz {name}'s {action.dest}"
            for value, refuse in fuzz_values(action, rng, paths, path_kinds):
                if action.option_strings:
                    flag = f"{action.option_strings[-1]}={value}"
                    argv = [flag, *base] if where == "start" else [*base, flag]
                else:
                    argv = [value if i == positions[action.dest] else a for i, a in enumerate(base)]
                outcome, err = run_case(main, argv, capsys)
                cases += 1
                lines = err.strip().splitlines()
                if outcome in ("work", "done"):
                    ok = not refuse
                else:
                    ok = outcome in (1, 2) and len(lines) == 1 and "Traceback" not in err
                if not ok:
                    problems.append(f"{name} {action.dest}={value[:40]!r}: "
                                    f"{str(outcome).strip()[-300:]} | stderr {err[-300:]!r}")
    assert not problems, f"{len(problems)} of {cases} cases:\n" + "\n".join(problems[:40])
    assert not (tmp_path / "pickle_ran").exists()                      # no checkpoint ran code
    print(f"{cases} cases")


def test_out_of_memory_is_one_line_and_exit_1(monkeypatch, capsys):
    def allocate(*a, **k):  # what torch's CPU allocator raises for a learner too large to build
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                           "can't allocate memory: you tried to allocate 2199023255552 bytes.")
    monkeypatch.setattr(models, "build", allocate)
    with pytest.raises(SystemExit) as e:
        bench.main(BENCH_TINY)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith("bench.py: error: out of memory (can't allocate memory: you tried "
                          "to allocate 2199023255552 bytes.)")

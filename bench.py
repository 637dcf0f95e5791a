"""bench.py: speed and memory, measured as ratios against a peer in the same run.

    python bench.py                 # every benchmark that exists so far
    python bench.py --only data     # one of them

data: segments/s of the MuST-C reader + collate + bucketed sampler, in the main process and with
one loader worker, against the peer a simpler reader would be: read the whole talk, then slice.
"""
from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

import data


@dataclass
class BenchConfig:
    only: str = ""                  # run one benchmark: data
    data: str = ""                  # an en-XX folder; default: a fresh demo corpus
    segments: int = 2000            # size of that fresh demo corpus (train split)
    max_seconds: float = 60.0       # padded audio per batch, as the CPU demo trains


def bench_data(cfg: BenchConfig) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(cfg.data) if cfg.data else data.write_demo_corpus(
            tmp, data.DemoConfig(train=cfg.segments, dev=10, test=10), verbose=False)
        vocab = data.build_vocab(root, 1000, verbose=False)
        ds = data.MustcSplit(root, "train", vocab, verbose=False)
        frames = [s.frames for s in ds.segments]
        rows = []
        for workers in (0, 1):
            sampler = data.BucketBatchSampler(frames, int(cfg.max_seconds * data.SAMPLE_RATE), seed=0)
            t0, n = time.perf_counter(), 0
            for batch in data.make_loader(ds, sampler, num_workers=workers):
                n += len(batch)
            rows.append((f"reader + collate, {workers} worker(s)", n / (time.perf_counter() - t0)))
        # the peer: read each talk whole and slice it, as a reader without seeking would
        t0 = time.perf_counter()
        for s in ds.segments:
            x, _ = sf.read(str(s.wav), dtype="float32")
            _ = x[s.offset:s.offset + s.frames]
        peer = len(ds) / (time.perf_counter() - t0)
        rows.append(("peer: read the whole talk, slice", peer))
        # memory while reading one segment: must not depend on the talk's length
        tracemalloc.start()
        ds.read_audio(0)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    print(f"\n## data ({len(ds)} segments, {ds.hours:.2f} h, batches of <= {cfg.max_seconds:.0f} s padded audio)")
    print(f"| {'what':<40} | {'segments/s':>10} | {'vs peer':>8} |\n|{'-' * 42}|{'-' * 12}|{'-' * 10}|")
    for name, rate in rows:
        print(f"| {name:<40} | {rate:>10.0f} | {rate / peer:>7.1f}x |")
    print(f"peak Python memory reading one {ds.segments[0].frames / 16000:.1f} s segment: {peak / 2**20:.2f} MiB")
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for k, v in BenchConfig.__dataclass_fields__.items():
        p.add_argument(f"--{k}", type=type(v.default), default=v.default)
    cfg = BenchConfig(**vars(p.parse_args()))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if cfg.only in ("", "data"):
        bench_data(cfg)


if __name__ == "__main__":
    main()

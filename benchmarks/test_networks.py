"""Per-network latency and peak memory, each case checked against PyTorch eager fp32 first (issue 6).

One case = one network (`dr_encoder`, `vae_encoder`, `unet_adaptor` at batch 2B, `vae_decoder`,
`text_encoders`) x backend x precision x latent. The reference output is computed once per
(network, latent) in this module, by the `torch` fp32 engine on the same seeded feed; the reference
case itself is timed like any other, so every ratio compares two measurements of the same run.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch


Feed = dict[str, torch.Tensor]


class References:
    """Eager fp32 outputs per (network, latent), computed once and kept (outputs only, small)."""

    def __init__(self, host, engines, opts, reference: tuple[str, str]) -> None:
        self.host, self.engines, self.opts, self.reference = host, engines, opts, reference
        self.cache: dict[tuple[str, tuple[int, int]], tuple[Feed, Feed]] = {}
        self.flops: dict[tuple[str, tuple[int, int]], int] = {}

    def get(self, network: str, latent: tuple[int, int]) -> tuple[Feed, Feed]:
        key = (network, latent)
        if key not in self.cache:
            engine, _ = self.engines.get(*self.reference, network)
            feed = self.host.sample_feed(network, latent)
            out = engine.infer(feed)
            self.cache[key] = feed, {k: v.detach().clone() for k, v in out.items()}
        return self.cache[key]

    def prefetch(self, network: str) -> None:
        """Before the network's torch weights are released: compute what later cases will need."""
        for latent in self.opts.latents:
            self.get(network, latent)


@pytest.fixture(scope="module")
def references(host, engines, opts, kit) -> Iterator[References]:
    refs = References(host, engines, opts, kit.REFERENCE)
    engines.before_release.append(refs.prefetch)
    yield refs
    engines.before_release.remove(refs.prefetch)


def test_network(benchmark, network: str, backend: str, precision: str, latent: tuple[int, int],
                 opts, engines, references: References, recorder, meta_model, kit) -> None:
    h, w = latent
    case = {"suite": "network", "network": network, "backend": backend, "precision": precision,
            "batch": opts.batch, "unet_batch": 2 * opts.batch if network == "unet_adaptor" else opts.batch,
            "latent": [h, w], "image": [8 * h, 8 * w], "steps": None, "device": str(opts.device),
            "model_size": opts.model_size, "weights": "checkpoints" if opts.checkpoints else "random"}
    benchmark.group = f"{network} latent {h}x{w}"
    try:
        feed, reference = references.get(network, latent)
        engine, details = engines.get(backend, precision, network)
    except kit.CaseSkipped as skip:
        recorder.add({**case, "status": "skipped", "reason": str(skip)})
        pytest.skip(str(skip))
    case.update(details)
    if (network, latent) not in references.flops:
        references.flops[network, latent] = kit.count_flops(meta_model, network, feed)
    case["flops"] = references.flops[network, latent]

    # 1. parity (the first call also pays for compilation / session warm-up: recorded, not timed)
    t0 = time.perf_counter()
    out = engine.infer(feed)
    kit.sync(opts.device)
    case["first_call_s"] = time.perf_counter() - t0
    case["parity"] = check = kit.parity(out, reference, precision, network)
    benchmark.extra_info.update(parity=check)
    if not check["passed"]:
        recorder.add({**case, "status": "parity-failed"})
        pytest.fail(f"{network} on {backend} {precision} at {h}x{w}: {check['metric']} = {check['rel_err']:.3g} "
                    f"> {check['tolerance']:g} (max abs {check['max_abs_err']:.3g})")

    # 2. time, with the peak memory of the timed calls
    def run() -> None:
        engine.infer(feed)
        kit.sync(opts.device)

    with kit.memory_probe(opts.device) as mem:
        # with --benchmark-disable (smoke test) pedantic calls `run` once: the memory figure stays
        benchmark.pedantic(run, rounds=opts.rounds, warmup_rounds=opts.warmup, iterations=1)
    benchmark.extra_info.update(memory=mem)
    recorder.add({**case, "status": "ok", "memory": mem, "timing": kit.timing_of(benchmark),
                  "warmup_rounds": opts.warmup})

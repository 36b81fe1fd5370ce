"""The calibration harness: reading the silicon rows, expressing them as specs, the robust fit, and the
fidelity gate on a fixed subset (simulator only) that fails if the median error rises above today's."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from conftest import ROOT

from emulator.calibration import fit as F
from emulator.calibration.express import (
    AUTO_ROUNDS_TOKENS,
    BENCHMARK_ROUNDS,
    MIN_ROUNDS,
    Expressed,
    Skip,
    auto_rounds,
    express,
)
from emulator.calibration.predict import _round_weighted, predict
from emulator.calibration.rows import copies_expressed, dedupe, load_rows
from emulator.calibration.score import is_target
from emulator.sim.simulator import simulate
from emulator.workload.plan import build_plan

DATA = os.path.join(ROOT, "..", "shared", "data", "measurements", "silicon_calibration.csv")
needs_data = pytest.mark.skipif(not os.path.exists(DATA), reason=f"needs {DATA} (the calibration set beside the repo)")

# The result on the subset below with the shipped constants (simulator; as many of the benchmark's 20
# rounds as fit in 300k simulated output tokens per row, at least 3), measured 2026-11-28 after each
# measurement was counted once and read as its id says (dedupe): median |error| TTFT 20.2%, TPOT 11.0%
# on 57 rows, plus a little margin. That is another subset (every 17th row of a smaller set): the
# one before, of the rows as they were read until then, read 22.6% / 8.4% on 69 rows (41 vLLM, 28
# SGLang); the model did not change in between. It read 23.1% /
# 9.1% before the eager prompt steps of 2026-11-28 (SGLang's and TensorRT-LLM's, and the fitted launch
# floor), and 31.1% / 9.9% before 2026-11-27's changes (gap-analysis harness scheduling, rounds, GEMM
# envelope, the generator's FP8 KV cache, the vLLM refit). Lower these when fidelity improves; the
# gate never lets them rise.
GATE_ROUND_TOKENS = 300_000
SUBSET_BASELINE = {"ttft": 20.8, "tpot": 11.5}


@needs_data
def test_rows_load_with_their_layouts_and_provenance():
    rows = load_rows(DATA)
    assert len(rows) == 4892
    distinct = dedupe(rows)
    assert 3400 < len(distinct) < 3550  # repeated measurements under other ids are counted once
    assert not any(r.conflict for r in distinct)  # every layout disagreement is settled (an id, P/D worker counts)
    # a 2026-04-06 row that multiplied the engine's sizes reads as its id names them: 8 GPUs, EP 8
    r = next(r for r in rows if r.id == "2026_04_06_deepseek_r1_b200_sxm_trtllm_fp8_agg_8192x1024_c4_tp8_ep8_920")
    assert (r.agg.tp, r.agg.dp, r.agg.moe_tp, r.agg.moe_ep) == (8, 1, 1, 8)
    # the gap-analysis file's copy of a row (figures rounded to 1/100 ms) gives way to the precise record
    kept = {r.id for r in distinct}
    assert "2026_03_25_qwen3_5_397b_b200_sxm_sglang_fp8_agg_1024x1024_c4_tp4_0_ep1_0_463" in kept
    assert not any(i.startswith("qwen3_5_397b_gap_analysis") and "c4_tp4_ep1_16" in i for i in kept)
    r = next(r for r in rows if r.id.startswith("2026_04_06_llama_3_1_70b_b200_sxm_vllm_fp4_agg_1024x1024_c16_tp4"))
    assert (r.backend, r.system, r.isl, r.osl, r.concurrency) == ("vllm", "b200_sxm", 1024, 1024, 16)
    assert r.agg.tp == 4 and r.group == "meta-llama/Llama-3.1-70B|b200_sxm|vllm|?"
    # vLLM spreads the experts over tp x attention-DP: a gap-analysis row that left attention_dp_size
    # blank with moe_tp twice its tp ran two DP ranks (it was skipped as inconsistent)
    r = next(r for r in rows if r.id.endswith("h200_sxm_vllm_agg_1000x100_c8_tp1_epnone_2"))
    assert (r.agg.tp, r.agg.dp, r.agg.moe_tp, r.agg.moe_ep) == (1, 2, 2, 1)
    pool = express(r, rounds=3).cluster.spec.pools[0]
    assert (pool.tp, pool.dp, pool.ep) == (1, 2, 1)
    disagg = [r for r in rows if r.mode == "disagg" and r.prefill and r.prefill.workers]
    assert disagg and all(r.decode.workers > 0 for r in disagg)


@needs_data
def test_3000_rows_and_nearly_3000_distinct_measurements_are_expressed_and_every_skip_says_why():
    """The issue asks for 3,000 of the set's 4,892 rows: 3,894 record a measurement infemu expresses.
    Counted once each (dedupe), 2,772 of the 3,467 measurements are expressed (at most 2,835 could be:
    632 of the skipped ones are P/D rows without worker counts)."""
    every_row = load_rows(DATA)
    rows = dedupe(every_row)
    outcomes = [express(r, rounds=3) for r in rows]
    expressed = [o for o in outcomes if not isinstance(o, Skip)]
    assert len(expressed) >= 2770
    assert copies_expressed(every_row, [o.row for o in expressed]) >= 3000
    reasons = Counter(o.reason for o in outcomes if isinstance(o, Skip))
    assert all(reasons)  # no silent drop
    assert reasons.most_common(1)[0][0].startswith("disaggregated row without worker counts")
    # every GPU system and engine of the set appears among the expressed rows
    assert {o.row.system for o in expressed} == {"h100_sxm", "h200_sxm", "b200_sxm", "b300_sxm", "gb200", "gb300"}
    assert {o.row.backend for o in expressed} == {"vllm", "sglang", "trtllm"}
    assert any(o.row.mode == "disagg" for o in expressed)


@needs_data
def test_a_row_becomes_the_deployment_the_benchmark_ran():
    rows = {r.id: r for r in load_rows(DATA)}
    row = next(r for i, r in rows.items() if "kimi_k2_5" in i and r.system == "h200_sxm" and r.backend == "vllm")
    ex = express(row, rounds=3)
    spec = ex.cluster.spec
    assert spec.model.name == "moonshotai/Kimi-K2.5" and spec.gpu == "h200-sxm"
    assert spec.engine.name == "vllm" and spec.engine.version == row.version
    assert spec.workload.arrival.n == row.concurrency and spec.workload.input_length.value == row.isl
    # sflow (the default): one warm-up round, every prompt fresh
    assert spec.workload.client.warmup_requests == row.concurrency and spec.workload.client.prompt_pool is None
    # bench_run: two warm-up rounds and a pool of 100 prompts the client reuses
    bench = express(row, rounds=3, template="bench_run").cluster.spec.workload.client
    assert bench.warmup_requests == 2 * row.concurrency and bench.prompt_pool == 100
    nv = next(r for r in rows.values() if "minimax" in r.id and r.precision == "fp4")
    assert express(nv, rounds=3).cluster.spec.model.name == "nvidia/MiniMax-M2.5-NVFP4"


@needs_data
def test_rows_of_the_gap_analysis_harness_run_sglang_as_its_defaults_schedule():
    rows = dedupe(load_rows(DATA))
    harnesses = Counter(r.harness for r in load_rows(DATA))
    assert harnesses["gap-analysis"] == 688 and harnesses["generator"] == 4892 - 688
    sglang = [r for r in rows if r.backend == "sglang" and r.mode == "agg"]
    gen = next(r for r in sglang if r.harness == "generator")
    assert express(gen, rounds=3).cluster.spec.engine.scheduling == "mixed"  # the generator's --enable-mixed-chunk
    # Qwen3-32B on two H100s, c128, 1024/128: the measurement has the long TTFT and short TPOT of prefill
    # batches that pause decoding (clients stay in waves); mixed chunks put the prefills into every
    # client's TPOT instead. The default schedule is closer on both.
    gap = next(
        r
        for r in sglang
        if r.harness == "gap-analysis"
        and r.model_path == "Qwen/Qwen3-32B"
        and r.agg.tp == 2
        and (r.isl, r.osl, r.concurrency) == (1024, 128, 128)
    )
    ex = express(gap, rounds=3)
    assert ex.cluster.spec.engine.scheduling == "auto"  # SGLang's default: prefill_first (engines.yaml)
    errors = {}
    for label, doc_scheduling in (("default", None), ("mixed", "mixed")):
        cluster = ex.cluster
        if doc_scheduling:
            spec = cluster.spec.model_copy(
                update={"engine": cluster.spec.engine.model_copy(update={"scheduling": doc_scheduling})}
            )
            cluster = cluster.model_copy(update={"spec": spec})
        p = predict(Expressed(gap, cluster, ex.load))
        errors[label] = (abs(np.log(p.ttft_ms / gap.ttft_ms)), abs(np.log(p.tpot_ms / gap.tpot_ms)))
    assert errors["default"][0] < errors["mixed"][0] / 2 and errors["default"][1] < errors["mixed"][1], errors


@needs_data
def test_the_generators_fp8_and_nvfp4_deployments_run_an_fp8_kv_cache():
    rows = dedupe(load_rows(DATA))

    def first(pred):
        return express(next(r for r in rows if r.mode == "agg" and pred(r)), rounds=3)

    # MiniMax-M2.5's FP8 checkpoint declares no KV quantization; aiconfigurator infers FP8 and deploys it
    minimax = first(lambda r: r.model_path == "MiniMaxAI/MiniMax-M2.5" and r.precision == "fp8")
    assert minimax.row.harness == "generator" and minimax.cluster.spec.model.kv_cache_dtype == "fp8"
    assert any("--kv-cache-dtype fp8" in a for a in minimax.assumptions)
    # the gap-analysis harness's FP8 rows keep the checkpoint's KV cache; gpt-oss (MXFP4) keeps BF16
    gap = first(lambda r: r.harness == "gap-analysis" and r.backend == "sglang" and r.precision == "fp8")
    assert gap.cluster.spec.model.kv_cache_dtype == "auto"
    assert first(lambda r: "gpt-oss" in r.model_path).cluster.spec.model.kv_cache_dtype == "auto"


def test_rounds_follow_the_benchmark_where_a_row_is_cheap_and_stay_three_or_more():
    class Row:
        def __init__(self, concurrency, osl):
            self.concurrency, self.osl = concurrency, osl

    assert auto_rounds(Row(16, 1024)) == BENCHMARK_ROUNDS
    assert auto_rounds(Row(4096, 8192)) == MIN_ROUNDS
    assert MIN_ROUNDS < auto_rounds(Row(256, 1024)) < BENCHMARK_ROUNDS
    assert auto_rounds(Row(256, 1024)) * 256 * 1024 <= AUTO_ROUNDS_TOKENS


@needs_data
def test_closed_loop_clients_settle_over_rounds_so_a_short_run_would_overstate_ttft():
    rows = dedupe(load_rows(DATA))
    row = next(r for r in rows if r.id.startswith("2026_04_06_llama_3_1_70b_b200_sxm_vllm_fp8_agg_1024x1024_c16_tp1"))
    ex = express(row)
    assert ex.load.rounds == BENCHMARK_ROUNDS
    plan = build_plan(ex.cluster.spec.workload)
    ttft = np.array([r.ttft_ms for r in simulate(ex.cluster, plan).records]).reshape(BENCHMARK_ROUNDS, -1).mean(axis=1)
    # round 0: every client at once; round 1 still bunched; the later rounds settle lower and stay there
    assert ttft[0] > ttft[1] > 1.2 * ttft[10:].mean()
    assert np.ptp(ttft[10:-1]) < 0.1 * ttft[10:-1].mean()
    assert predict(ex).ttft_ms < predict(express(row, rounds=3)).ttft_ms


def test_round_weighting_stands_the_middle_rounds_for_every_middle_round():
    c = 2
    values = np.array([10, 10, 4, 4, 4, 4, 1, 1], dtype=float)  # first round 10, middle 4, last 1
    assert _round_weighted(values, c, 4, 20) == pytest.approx((10 + 18 * 4 + 1) / 20)
    assert _round_weighted(values, c, 4, 4) == pytest.approx(values.mean())


def test_the_robust_linearised_solve_recovers_constants_and_ignores_an_outlier_group():
    rng = np.random.default_rng(0)
    n, p = 200, len(F.PARAMETERS)
    jac = rng.uniform(0.0, 0.02, (n, 2, p))
    truth = np.array([5.0, 3.0, 20.0, 500.0, 10.0, 100.0, 150.0])
    theta0 = np.zeros(p)
    residuals = -(jac @ (truth - theta0))  # log(pred/meas) at theta0: predictions too low by J (truth - theta0)
    residuals[:10] += 2.0  # one group measured something else entirely
    lin = F.Linearisation(theta0, residuals, jac)
    theta = F.solve(lin, np.ones(n, dtype=bool), max_step=1e6)
    assert np.allclose(theta, truth, rtol=0.05)
    # leaving the outlier group out changes little: the fit is robust, not dragged by 5% of the rows
    mask = np.arange(n) >= 10
    assert np.allclose(F.solve(lin, mask, max_step=1e6), truth, rtol=0.05)
    # a constant no row responds to (the P/D hand-off, fitted on aggregated rows) keeps its value, and so
    # does one held fixed
    lin.jacobian[:, :, -1] = 0.0
    lin.theta[-1] = 42.0
    held = F.solve(lin, np.ones(n, dtype=bool), max_step=1e6, free=np.arange(p) != 0)
    assert held[-1] == 42.0 and held[0] == 0.0 and not np.allclose(held[1:-1], 0.0)


class _Row:
    def __init__(self, i: int, ttft_ms: float, tpot_ms: float) -> None:
        self.id, self.ttft_ms, self.tpot_ms = f"row-{i}", ttft_ms, tpot_ms
        self.mode = "agg"  # aggregated: the P/D hand-off constant is not theirs


class _Ex:
    def __init__(self, row: _Row, queue_ms: float, step_ms: float) -> None:
        self.row, self.queue_ms, self.step_ms = row, queue_ms, step_ms


def _queue_like_simulator(monkeypatch, truth: np.ndarray) -> list[_Ex]:
    """Rows whose 'simulated' TTFT responds to the API latency as a closed-loop queue does: the latency
    adds itself but spreads the clients, so their wait shrinks (not linear in the constant; still
    rising), and TPOT to the fixed step time."""

    def ttft(ex: _Ex, theta: np.ndarray) -> float:
        latency = theta[0]
        return ex.queue_ms / (1.0 + latency / 100.0) + 3.0 * latency + 20.0

    def tpot(ex: _Ex, theta: np.ndarray) -> float:
        return ex.step_ms + theta[3] / 1000.0

    rng = np.random.default_rng(1)
    rows = []
    for i in range(60):
        ex = _Ex(_Row(i, 0.0, 0.0), float(rng.uniform(10, 250)), float(rng.uniform(5, 40)))
        ex.row.ttft_ms, ex.row.tpot_ms = ttft(ex, truth), tpot(ex, truth)
        rows.append(ex)

    def run_rows(jobs, workers=1, progress=None):
        return [F.Prediction(ex.row.id, ttft(ex, th), tpot(ex, th), 1, 0, None, 0.0) for ex, th in jobs]

    monkeypatch.setattr(F, "run_rows", run_rows)
    return rows


def test_gauss_newton_reaches_constants_the_chord_method_stops_short_of(monkeypatch):
    truth = np.array([150.0, 0.0, 0.0, 900.0, 0.0, 0.0, 0.0])
    rows = _queue_like_simulator(monkeypatch, truth)
    start = np.array([20.0, 0.0, 0.0, 300.0, 0.0, 0.0, 0.0])
    lines: list[str] = []
    theta, residuals = F.fit(rows, start, iterations=4, relinearise=True, log=lines.append)
    assert abs(theta[0] - truth[0]) < 2.0 and abs(theta[3] - truth[3]) < 10.0, lines
    assert F.median_errors(residuals)[0] < 1.0
    losses = [float(line.rsplit("loss ", 1)[1]) for line in lines if "loss " in line and ">=" not in line]
    assert losses == sorted(losses, reverse=True), lines  # an accepted step never raises the loss
    # the chord method's derivatives, taken at the start, and its trust region leave it short
    chord, _ = F.fit(rows, start, iterations=1, log=lambda _: None)
    assert abs(chord[0] - truth[0]) > 20.0


def test_gauss_newton_keeps_constants_no_step_improves(monkeypatch):
    truth = np.array([150.0, 0.0, 0.0, 900.0, 0.0, 0.0, 0.0])
    rows = _queue_like_simulator(monkeypatch, truth)
    lines: list[str] = []
    theta, _ = F.fit(rows, truth, iterations=3, relinearise=True, log=lines.append)
    assert np.array_equal(theta, truth)
    assert any("no step lowers the loss" in line for line in lines), lines


def test_cross_validation_keeps_only_the_part_of_a_folds_step_the_simulator_confirms(monkeypatch):
    """A held-out group's linearised step can land where the queue saturates: the refit keeps the
    largest tried fraction of it that lowers the simulated loss of the other groups, none where no
    fraction does, and a fraction under which one of their rows fails is not lower."""

    # three groups of ten rows; the 'simulator' reads TTFT exactly at a streaming cost of 50 (theta[2]),
    # off by 1% a unit either side, with a saturation past 70 that the linearisation does not know;
    # the first row fails past 55
    def ttft(ex: _Ex, theta: np.ndarray) -> float | None:
        if ex.row.id == "row-0" and theta[2] > 55:
            return None
        return ex.row.ttft_ms * (1 + 0.01 * (theta[2] - 50)) + 100.0 * max(0.0, theta[2] - 70)

    rows = [_Ex(_Row(i, 100.0 + 7 * i, 10.0), 0.0, 0.0) for i in range(30)]
    groups = np.array([f"g{i // 10}" for i in range(30)])

    def run_rows(jobs, workers=1, progress=None):
        return [F.Prediction(ex.row.id, ttft(ex, th), ex.row.tpot_ms, 1, 0, None, 0.0) for ex, th in jobs]

    monkeypatch.setattr(F, "run_rows", run_rows)
    theta0 = np.zeros(len(F.PARAMETERS))
    theta0[2] = 20.0
    lin = F.linearise(rows, theta0)
    assert not np.isnan(lin.residuals).any()

    def step(d: float) -> np.ndarray:
        out = np.zeros(len(F.PARAMETERS))
        out[2] = d
        return out

    steps = {"g0": step(80.0), "g1": step(-20.0), "g2": step(40.0), "g3": step(0.0)}
    chosen = F.line_search(rows, groups, lin, steps, F.LINE_SEARCH_FRACTIONS)
    # g0: 100 saturates, 60 reads 10% high against 30% low at the start
    assert chosen["g0"][1] == 0.5 and chosen["g0"][0][2] == 60.0
    # g1: every fraction of a step away from the data raises the loss
    assert chosen["g1"][1] == 0.0 and np.array_equal(chosen["g1"][0], theta0)
    # g2: the whole step (60) makes row-0, one of its training rows, fail; half of it (40) is kept
    assert chosen["g2"][1] == 0.5 and chosen["g2"][0][2] == 40.0
    # a group with no step keeps the constants
    assert chosen["g3"][1] == 0.0 and np.array_equal(chosen["g3"][0], theta0)


def test_the_robust_loss_counts_every_row_that_ran_and_skips_failures():
    r = np.array([[0.0, 0.0], [0.05, -0.05], [np.nan, 0.1]])
    assert F.robust_loss(r) == pytest.approx(2 * 2 * (np.sqrt(2.0) - 1.0))


def fixed_subset(rows):
    """Target-family rows of modest concurrency, every 17th of them by id: a stable, quick sample."""
    pick = sorted((r for r in rows if is_target(r) and r.concurrency and r.concurrency <= 64), key=lambda r: r.id)
    return pick[::17]


@needs_data
def test_fidelity_on_a_fixed_subset_does_not_regress():
    rows = fixed_subset(dedupe(load_rows(DATA)))
    errors = []
    for r in rows:
        ex = express(r, rounds=auto_rounds(r, GATE_ROUND_TOKENS))
        if isinstance(ex, Skip):
            continue
        p = predict(ex)
        assert p.error is None, (r.id, p.error)
        errors.append((abs(p.ttft_ms / r.ttft_ms - 1) * 100, abs(p.tpot_ms / r.tpot_ms - 1) * 100))
    e = np.array(errors)
    assert len(e) >= 40
    ttft, tpot = np.median(e, axis=0)
    assert ttft <= SUBSET_BASELINE["ttft"] and tpot <= SUBSET_BASELINE["tpot"], (ttft, tpot)


@needs_data
def test_the_simulation_budget_skips_only_the_giant_rows_and_says_so():
    from emulator.calibration.express import over_budget

    rows = dedupe(load_rows(DATA))
    expressed = [ex for ex in (express(r, rounds=3) for r in rows) if not isinstance(ex, Skip)]
    over = [s for s in (over_budget(ex) for ex in expressed) if s is not None]
    assert 0 < len(over) < 0.01 * len(expressed)
    assert all(s.row.concurrency * s.row.osl > 1e6 and "--max-simulated-tokens 0" in s.reason for s in over)
    assert all(over_budget(ex, None) is None for ex in expressed[:50])


@needs_data
def test_cross_validation_samples_the_groups_in_proportion_to_their_rows_as_the_shipped_fit_does():
    rows = dedupe(load_rows(DATA))
    expressed = [ex for ex in (express(r, rounds=3) for r in rows if r.backend == "vllm") if not isinstance(ex, Skip)]
    picked = F._per_group_sample(expressed, 8)
    sizes = Counter(ex.row.group for ex in expressed)
    groups = Counter(expressed[i].row.group for i in picked)
    assert set(groups) == set(sizes)  # no group left without derivatives
    assert len(picked) == len(set(picked)) and 8 * len(sizes) <= len(picked) < 8 * len(sizes) + len(sizes)
    share = len(picked) / len(expressed)
    for g, n in sizes.items():  # a group's rows weigh as they do in a uniform subset of the rows
        assert abs(groups[g] - n * share) <= 1.5, (g, groups[g], n * share)


def _row(rid: str, ttft: float, tpot: float, tp: int, dp: int = 1, moe_ep: int = 1):
    from emulator.calibration.rows import CalibrationRow, Layout

    lay = Layout(tp=tp, pp=1, dp=dp, moe_tp=tp * dp // moe_ep, moe_ep=moe_ep, batch=8)
    return CalibrationRow(
        id=rid, backend="vllm", version="0.18.0", model_path="moonshotai/Kimi-K2.5", system="b200_sxm",
        precision="fp4", mode="agg", isl=1024, osl=1024, gemm_quant="nvfp4", moe_quant="nvfp4", concurrency=8,
        agg=lay, prefill=None, decode=None, ttft_ms=ttft, tpot_ms=tpot, image="", source="file", wip=False,
    )  # fmt: skip


def test_dedupe_counts_a_measurement_once_and_settles_its_layout_by_the_id_or_skips_it():
    precise = _row("a_cfg1", 231.8478822184261, 8.065206402314423, tp=4, dp=4, moe_ep=16)
    rounded = _row("b_tp4_ep4_3", 231.85, 8.07, tp=4, moe_ep=4)  # a rounded copy whose id names 4 GPUs, EP 4
    other = _row("c_cfg2", 300.0, 9.0, tp=8)
    out = dedupe([precise, rounded, other])
    assert [r.id for r in out] == ["b_tp4_ep4_3", "c_cfg2"] and not any(r.conflict for r in out)
    same_layout = dedupe([_row("x", 231.85, 8.07, tp=4), replace(precise, agg=_row("y", 0, 0, tp=4).agg)])
    assert [r.id for r in same_layout] == ["a_cfg1"]  # the more precise record of one layout stays
    # two layouts and no id to settle them: both stay, marked, and express() skips them saying why
    unsettled = dedupe([precise, _row("d_cfg3", 231.85, 8.07, tp=4, moe_ep=4)])
    assert len(unsettled) == 2 and all(r.conflict for r in unsettled)
    skip = express(unsettled[0], rounds=3)
    assert isinstance(skip, Skip) and "another layout" in skip.reason
    # one measurement filed under two model paths of one architecture (DeepSeek-R1 runs filed as V3)
    r1 = replace(other, id="e_dsr1", model_path="deepseek-ai/DeepSeek-R1")
    v3 = replace(other, id="f_cfg4", model_path="deepseek-ai/DeepSeek-V3")
    assert [r.id for r in dedupe([r1, v3])] == ["e_dsr1"]


def test_dedupe_prefers_the_pd_record_that_has_its_worker_counts():
    from emulator.calibration.rows import Layout

    with_counts = replace(
        _row("g_cfg5", 500.0, 20.0, tp=8),
        mode="disagg",
        agg=None,
        prefill=Layout(tp=1, pp=1, dp=8, moe_tp=1, moe_ep=8, workers=1),
        decode=Layout(tp=1, pp=1, dp=32, moe_tp=1, moe_ep=32, workers=1),
    )
    without = replace(
        with_counts,
        id="h_file",
        prefill=Layout(tp=8, pp=1, dp=1, moe_tp=1, moe_ep=8, workers=0),
        decode=Layout(tp=32, pp=1, dp=1, moe_tp=4, moe_ep=8, workers=0),
    )
    out = dedupe([without, with_counts])
    assert [r.id for r in out] == ["g_cfg5"] and not out[0].conflict


def test_the_trend_table_shows_the_signed_bias_by_concurrency_and_leaves_out_thin_cells():
    from emulator.calibration.score import TREND_MIN_ROWS, RowOutcome, format_trend, trend

    def outcome(rid: str, c: int, ttft_ratio: float, tpot_ratio: float, **changes) -> RowOutcome:
        row = replace(_row(rid, 100.0, 10.0, tp=8), concurrency=c, **changes)
        pred = F.Prediction(rid, 100.0 * ttft_ratio, 10.0 * tpot_ratio, 1, 0, None, 0.0)
        return RowOutcome(row, fitted=pred, cv=pred)

    rows = [outcome(f"lo{i}", 4, 1.2 + 0.01 * i, 1.0) for i in range(TREND_MIN_ROWS)]  # median +22%
    rows += [outcome(f"hi{i}", 256, 0.7, 0.95) for i in range(TREND_MIN_ROWS)]
    rows += [outcome(f"thin{i}", 64, 2.0, 2.0) for i in range(TREND_MIN_ROWS - 1)]  # one short: left out
    rows += [outcome(f"pd{i}", 4, 5.0, 5.0, mode="disagg") for i in range(TREND_MIN_ROWS)]  # not a target row
    rows += [RowOutcome(replace(_row("skipped", 100.0, 10.0, tp=8), concurrency=4), skip="why")]
    cells = trend(rows)
    assert [(c["concurrency"], c["rows"]) for c in cells] == [(4, TREND_MIN_ROWS), (256, TREND_MIN_ROWS)]
    assert cells[0]["ttft_signed_median_pct"] == pytest.approx(22.0)
    assert cells[1]["ttft_signed_median_pct"] == pytest.approx(-30.0)
    assert cells[1]["tpot_signed_median_pct"] == pytest.approx(-5.0)
    assert format_trend(cells) == ["  vllm     1024x1024  c4:+22/+0 c256:-30/-5"]


def test_the_ttft_anatomy_tool_weighs_rounds_as_a_shorter_benchmark_would_and_reads_the_first_rounds_weight(
    monkeypatch,
):
    """tools/ttft_anatomy.py (docs/fidelity.md, "the first round's weight"): a benchmark of K rounds
    averages its first K - 1 and its last; fewer simulated rounds let the middle stand for the rest;
    the implied weight solves w x first + (1 - w) x later = measured, and is withheld when the first
    round hardly differs from the later ones."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("ttft_anatomy", os.path.join(ROOT, "tools", "ttft_anatomy.py"))
    tool = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "ttft_anatomy", tool)  # its dataclass looks its module up there
    spec.loader.exec_module(tool)
    rounds = np.array([300.0, 200.0, 100.0, 100.0, 100.0])
    assert tool.mean_over(rounds, 5) == pytest.approx(160.0)
    assert tool.mean_over(rounds, 3) == pytest.approx((300 + 200 + 100) / 3)
    assert tool.mean_over(rounds, 20) == pytest.approx((300 + 18 * (400 / 3) + 100) / 20)
    assert tool.mean_over(rounds, 1) == 300.0
    assert tool.first_round_weight(np.array([300.0, 100.0, 100.0]), 120.0) == pytest.approx(0.1)
    assert tool.first_round_weight(np.array([300.0, 100.0, 100.0]), 90.0) == pytest.approx(-0.05)
    assert tool.first_round_weight(np.array([125.0, 100.0, 100.0]), 120.0) is None


def test_a_per_group_correction_separates_a_deployments_level_from_the_models_shape():
    """docs/fidelity.md ("a fixed cost per deployment"): each row corrected by its own group's other
    rows. A group that reads 2x high at every row is a level (the correction removes it); a group
    that reads alternately 20% high and low is the model's shape (no level removes it)."""
    from emulator.calibration.score import (
        RowOutcome,
        format_per_group_correction,
        held_out_within_group,
        per_group_correction,
    )

    pairs = {"a": [(200.0, 100.0), (400.0, 200.0), (300.0, 150.0)], "b": [(50.0, 100.0)]}  # b: one row, left out
    assert held_out_within_group(pairs, additive=False) == pytest.approx(0.0)
    # offsets: row 1's others differ by +100 and -200 (median -50: 50 vs 150 measured), row 2's by +50
    # and -200 (-75: 25 vs 200), row 3's by +50 and +100 (+75: 375 vs 100)
    rows = {"a": [(100.0, 150.0), (100.0, 200.0), (300.0, 100.0)]}
    assert held_out_within_group(rows, additive=True) == pytest.approx(100 * np.median([100 / 150, 175 / 200, 2.75]))
    assert held_out_within_group({"b": [(1.0, 1.0)]}, additive=False) is None

    def outcome(rid: str, model: str, ratio: float, **changes) -> RowOutcome:
        row = replace(_row(rid, 100.0, 10.0, tp=8), model_path=model, concurrency=4, **changes)
        pred = F.Prediction(rid, 100.0 * ratio, 10.0 * ratio, 1, 0, None, 0.0)
        return RowOutcome(row, fitted=pred, cv=pred)

    outcomes = [outcome(f"a{i}", "org/A", 2.0) for i in range(3)]
    outcomes += [outcome(f"b{i}", "org/B", 1.2 if i % 2 else 0.8) for i in range(4)]
    outcomes += [outcome(f"pd{i}", "org/A", 9.0, mode="disagg") for i in range(3)]  # not target rows
    outcomes.append(RowOutcome(replace(_row("skipped", 100.0, 10.0, tp=8), concurrency=4), skip="why"))
    d = per_group_correction(outcomes)
    assert (d["rows"], d["groups"]) == (7, 2)
    assert d["ttft_pct"]["as_predicted"] == pytest.approx(20.0)  # 100% x 3, 20% x 4
    # A's rows come out exact; B's: a low row gets its others' median factor 1/1.2 (33% low), a high
    # row 1/0.8 (50% high), so the median over all seven is 33%
    assert d["ttft_pct"]["group_factor"] == pytest.approx(100 / 3)
    assert d["tpot_pct"]["group_factor"] == pytest.approx(100 / 3)
    assert "TTFT 20.0% -> 33.3% (a factor)" in format_per_group_correction(d)

"""`scripts/bench_train.py`: step-time ratios paired by round, with intervals, and its modes."""

import mmap

import numpy as np
import pytest


@pytest.fixture(scope="module")
def bench_train(load_script):
    return load_script("bench_train")


def test_a_load_shared_by_both_steps_of_a_round_cancels(bench_train):
    # The machine's load triples the step time in some rounds; a mode 10% slower in every round
    # is 1.10x with no spread.
    load = np.array([1.0, 3.0, 1.2, 2.8, 1.1, 3.1, 1.0])
    ratio, low, high = bench_train.paired_ratio(list(1.1 * load), list(load))
    assert ratio == pytest.approx(1.1)
    assert low == pytest.approx(1.1) and high == pytest.approx(1.1)


def test_the_interval_covers_the_true_ratio_and_narrows_with_rounds(bench_train):
    rng = np.random.default_rng(1)
    widths, covered = {}, 0
    for rounds in (10, 40):
        for trial in range(20):
            load = rng.uniform(1.0, 2.0, rounds)
            noise = rng.normal(1.0, 0.03, rounds)
            ratio, low, high = bench_train.paired_ratio(list(0.95 * load * noise), list(load))
            covered += low <= 0.95 <= high
            widths.setdefault(rounds, []).append(high - low)
    assert covered >= 34  # of 40 intervals at a nominal 95%
    assert np.median(widths[40]) < 0.7 * np.median(widths[10])


def test_a_single_round_has_no_interval_beyond_itself(bench_train):
    assert bench_train.paired_ratio([2.0], [1.0]) == (2.0, 2.0, 2.0)


def test_every_mode_takes_every_place_in_a_round_equally_often(bench_train):
    calls = []

    def step_of(mode):
        def step(state, batch):
            calls.append(mode)
            return state, np.zeros(())
        return step

    modes = ["bf16", "bf16-null", "b1.58"]
    steps = {mode: (step_of(mode), None, None) for mode in modes}
    samples = bench_train.interleaved_step_times(steps, rounds=6)
    assert all(len(samples[mode]) == 6 for mode in modes)
    rounds = [calls[i:i + 3] for i in range(0, len(calls), 3)]
    assert all(sorted(r) == sorted(modes) for r in rounds)
    for place in range(3):
        assert sorted(r[place] for r in rounds) == sorted(modes * 2)


def test_interleaved_steps_report_the_page_faults_and_kernel_time_of_each_step(bench_train):
    def touch_fresh_memory(state, batch):  # 64 MiB mapped afresh every call, whatever malloc
        with mmap.mmap(-1, 64 * 2**20) as fresh:
            pages = np.frombuffer(fresh, np.uint8)
            pages[::4096] = 1
            del pages
        return state, np.zeros(())

    def compute_only(state, batch):
        return state, np.zeros(())

    steps = {"bf16": (compute_only, None, None), "b1.58": (touch_fresh_memory, None, None)}
    usage = {}
    bench_train.interleaved_step_times(steps, rounds=4, kernel_usage=usage)
    assert [len(usage[mode]) for mode in steps] == [4, 4]
    faults = {mode: np.median([f for f, _ in usage[mode]]) for mode in steps}
    # 64 MiB is 16,384 pages of 4 KiB, or 32 of 2 MiB where the kernel backs it with huge pages
    assert faults["b1.58"] >= 32 and faults["bf16"] < faults["b1.58"] / 4
    assert all(system_s >= 0 for _, system_s in usage["b1.58"])


@pytest.mark.slow
def test_every_mode_compiles_a_step_of_the_recipe_it_names(bench_train):
    """Each mode's step trains: a finite loss, and modes of one recipe agree on it (they differ
    only in how the step is computed: a second copy, XLA's weight gradient or attention, or the
    integer products, whose forward equals fake quantization's)."""
    _assert_every_mode_trains(bench_train)


@pytest.mark.slow
def test_every_mode_compiles_a_step_on_amx_tiles(bench_train, amx_tiles):
    """The same with our kernels on AMX tiles, where the modes route differently (each mode
    patches the routing it measures; one that missed an AMX route failed to compile only on
    AMX CPUs, unseen by the test above, which runs with the tiles off). Skipped elsewhere."""
    amx_tiles(True)
    _assert_every_mode_trains(bench_train)


def _assert_every_mode_trains(bench_train):
    losses = {}
    for name, mode in bench_train.MODES.items():
        train_step, state, batch = bench_train.compiled_step("ladder-12k", mode, 2, 16)
        losses[name] = float(train_step(state, batch)[1]["loss"])
    assert all(np.isfinite(list(losses.values())))
    for name, mode in bench_train.MODES.items():
        same_recipe = losses["b1.58" if mode.precision == "b1.58" else mode.precision]
        assert losses[name] == pytest.approx(same_recipe, abs=2e-2), name

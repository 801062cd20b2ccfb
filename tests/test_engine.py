"""Serving engine: equals the sampler, continuous batching == alone, KV pool, cancel, scheduler."""

from __future__ import annotations

import pytest
import torch

from lumos.config import SamplerConfig
from lumos.engine import Engine, EngineRequest, KVPool, Scheduler
from lumos.kvcache import KVCache
from lumos.sampler import VideoRequest, generate, window_start


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _given(n, seed=0):
    return torch.randint(0, 512, (n, 3, 4), generator=_gen(seed)) if n else None


def _by_session(events):
    out: dict[str, list] = {}
    for e in events:
        out.setdefault(e.session_id, []).append(e)
    return out


def _codes(events):
    return torch.stack([e.codes for e in events])


# -- 1. the engine alone reproduces the sampler --------------------------------------------------


@pytest.mark.parametrize("batching", [True, False])
@pytest.mark.parametrize(
    "given,sc",
    [
        (0, SamplerConfig(steps=3, cfg=3.0)),
        (1, SamplerConfig(steps=4, cfg=1.0)),
        (2, SamplerConfig(steps=3, cfg=2.0, top_k=40, reference_compat=True)),
        (2, SamplerConfig(steps=3, cfg=2.0, window=2)),  # the window slides at frames 3 and 4
        (1, SamplerConfig(steps=4, cfg=3.0, guidance_steps=2)),  # then the conditional row only
        (2, SamplerConfig(steps=3, cfg=2.0, window=2, guidance_steps=1)),
    ],
)
@pytest.mark.parametrize("row_threads", [1, 2])
def test_engine_alone_equals_sampler_generate(tiny_model, layout, batching, given, sc, row_threads):
    giv = _given(given)
    ref = generate(tiny_model, layout, [VideoRequest([5, 6, 7], 3, giv, generator=_gen(1))], sc)
    eng = Engine(tiny_model, layout, batching=batching, row_threads=row_threads)
    eng.add(EngineRequest("s", [5, 6, 7], giv, 3, sc, generator=_gen(1)))
    events = eng.run_until_idle()
    assert [e.index for e in events] == [given, given + 1, given + 2]
    assert [e.done for e in events] == [False, False, True]
    assert torch.equal(_codes(events), ref[0][given:])
    st = eng.stats()
    assert st["running"] == 0 and st["waiting"] == 0 and st["frames"] == 3
    assert st["steps"] == 3 * sc.steps
    assert st["slides"] == (2 if sc.window else 0)
    # prefill + (S steps + commit) per frame + one prefill per slide
    assert st["forwards"] == 1 + 3 * (sc.steps + 1) + st["slides"]


# -- 2. continuous batching == each session alone --------------------------------------------------

SESSIONS = {  # id: (text, given frames, n_frames, sampler)
    "a": ([5], 0, 2, SamplerConfig(steps=3, cfg=3.0)),
    "b": ([5, 6, 7, 8, 9, 10], 1, 1, SamplerConfig(steps=4, cfg=3.0)),
    "c": (None, 2, 2, SamplerConfig(steps=3, cfg=1.0)),  # one row: mixed row counts
    "d": ([11, 12], 0, 3, SamplerConfig(steps=4, cfg=2.0)),
    "e": ([13], 2, 3, SamplerConfig(steps=3, cfg=2.0, window=2, window_stride=2)),  # slides once
    # guidance on the first steps only: the batch's rows change from step to step
    "f": ([14, 15], 1, 2, SamplerConfig(steps=4, cfg=3.0, guidance_steps=1)),
    "g": ([16], 0, 2, SamplerConfig(steps=3, cfg=2.0, guidance_steps=2)),
}


def _request(sid, seed=None):
    text, given, n, sc = SESSIONS[sid]
    seed = seed if seed is not None else ord(sid)
    return EngineRequest(sid, text, _given(given, ord(sid)), n, sc, generator=_gen(seed))


def _recording(eng):
    seen = {}
    eng.on_logits = lambda sid, k, s, lg: seen.__setitem__((sid, k, s), lg.clone())
    return seen


@pytest.mark.parametrize("batching,row_threads", [(True, 1), (False, 1), (True, 3)])
def test_continuous_batching_matches_each_session_alone(tiny_model, layout, batching, row_threads):
    alone_logits, alone_codes = {}, {}
    for sid in SESSIONS:
        eng = Engine(tiny_model, layout, batching=False)
        seen = _recording(eng)
        eng.add(_request(sid))
        alone_codes[sid] = _codes(eng.run_until_idle())
        alone_logits.update(seen)

    eng = Engine(tiny_model, layout, max_batch=7, batching=batching, row_threads=row_threads)
    seen = _recording(eng)
    eng.add(_request("a"))
    eng.add(_request("f"))
    eng.add(_request("b"))
    events = eng.step() + eng.step()  # a, f, b two steps into their first frames
    eng.add(_request("c"))
    events += eng.step()  # c joins at step 0 while a, f and b are mid-frame
    eng.add(_request("d"))
    eng.add(_request("e"))
    eng.add(_request("g"))
    assert eng.stats()["running"] == 4
    events += eng.run_until_idle()

    assert set(seen) == set(alone_logits)
    for key, lg in seen.items():
        assert torch.allclose(lg, alone_logits[key], atol=1e-4, rtol=1e-4), key
        sc = SESSIONS[key[0]][3]
        past = sc.guidance_steps is not None and key[2] >= sc.guidance_steps
        assert lg.shape[0] == (1 if past or sc.cfg == 1.0 else 2), key  # only the rows it needs
    per = _by_session(events)
    for sid in SESSIONS:
        assert torch.equal(_codes(per[sid]), alone_codes[sid]), sid
    n_frames = sum(len(v) for v in per.values())
    per_session_steps = sum(n * sc.steps for _, _, n, sc in SESSIONS.values())
    st = eng.stats()
    assert st["slides"] == 1  # e's window moved once, rebuilding only its rows
    prefills = len(SESSIONS) + st["slides"]
    if batching:  # prefills + one forward a step for everyone + at most one commit a step
        assert st["steps"] < per_session_steps
        assert st["forwards"] <= prefills + st["steps"] + n_frames
    else:
        assert st["forwards"] == prefills + per_session_steps + n_frames
    assert st["batch_kv_bytes"] == 0  # storage freed when idle


def test_batched_logits_match_the_sampler_reference(tiny_model, layout):
    """The batched engine's codes for every session equal `generate` for that request alone."""
    eng = Engine(tiny_model, layout)
    for sid in SESSIONS:
        eng.add(_request(sid))
    per = _by_session(eng.run_until_idle())
    for sid, (text, given, n, sc) in SESSIONS.items():
        req = VideoRequest(text, n, _given(given, ord(sid)), generator=_gen(ord(sid)))
        ref = generate(tiny_model, layout, [req], sc)[0]
        assert torch.equal(_codes(per[sid]), ref[given:]), sid


# -- 3. many sessions ----------------------------------------------------------------------------


@pytest.mark.parametrize("max_batch", [8, 3])
def test_eight_sessions_get_their_frames_in_order(tiny_model, layout, max_batch):
    sc = SamplerConfig(steps=3, cfg=2.0)
    eng = Engine(tiny_model, layout, max_batch=max_batch)
    want = {}
    for i in range(8):
        t0, n = i % 3, 1 + i % 3
        sid = f"s{i}"
        eng.add(EngineRequest(sid, [5 + i] * (1 + i), _given(t0, i), n, sc, generator=_gen(i)))
        want[sid] = list(range(t0, t0 + n))
    eng.step()
    assert eng.stats()["running"] == min(8, max_batch)
    assert eng.stats()["waiting"] == 8 - min(8, max_batch)
    per = _by_session(eng.run_until_idle())
    assert set(per) == set(want)
    for sid, evs in per.items():
        assert [e.index for e in evs] == want[sid]
        assert [e.done for e in evs] == [False] * (len(evs) - 1) + [True]
        assert all(e.codes.shape == (3, 4) for e in evs)
    assert eng.stats()["frames"] == sum(len(v) for v in want.values())


# -- 4. KV pool: admission, LRU eviction, rebuild ----------------------------------------------


def test_admission_blocks_until_a_session_finishes(tiny_model, layout):
    sc = SamplerConfig(steps=2, cfg=2.0)
    probe = Engine(tiny_model, layout)
    need = probe.request_bytes(EngineRequest("x", [5], None, 2, sc))
    eng = Engine(tiny_model, layout, kv_budget_bytes=need + need // 2)
    eng.add(EngineRequest("a", [5], None, 2, sc, generator=_gen(0)))
    eng.add(EngineRequest("b", [6], None, 2, sc, generator=_gen(1)))
    first = eng.step()
    assert first == [] and eng.stats()["running"] == 1 and eng.stats()["waiting"] == 1
    events = first + eng.run_until_idle()
    assert [e.session_id for e in events] == ["a", "a", "b", "b"]
    pool = eng.pool.snapshot()
    assert pool["evictions"] == 1 and "a" not in eng.pool and "b" in eng.pool
    assert pool["bytes_used"] <= eng.pool.budget_bytes
    with pytest.raises(ValueError, match="budget"):
        eng.add(EngineRequest("huge", [5], None, 8, sc))


def test_lru_evicts_the_least_recently_used_idle_cache(tiny_model, layout):
    sc = SamplerConfig(steps=2, cfg=2.0)
    need = Engine(tiny_model, layout).request_bytes(EngineRequest("x", [5], None, 1, sc))
    eng = Engine(tiny_model, layout, kv_budget_bytes=int(2.5 * need))
    for sid in ("a", "b"):
        eng.add(EngineRequest(sid, [5], None, 1, sc, generator=_gen(0)))
        eng.run_until_idle()
    assert eng.pool.sessions() == ["a", "b"]
    assert eng.pool.get("a") is not None  # touch a: b is now least recently used
    eng.add(EngineRequest("c", [5], None, 1, sc, generator=_gen(0)))
    eng.run_until_idle()
    assert "b" not in eng.pool and "a" in eng.pool and "c" in eng.pool
    assert eng.pool.stats.evictions == 1


@pytest.mark.parametrize("window", [None, 1, 3])
def test_evicted_session_is_rebuilt_and_continues_identically(tiny_model, layout, window):
    sc = SamplerConfig(steps=3, cfg=3.0, window=window)
    need = Engine(tiny_model, layout).request_bytes(EngineRequest("x", [5, 6], None, 4, sc))

    def two_requests(evict: bool, batching: bool):
        eng = Engine(tiny_model, layout, kv_budget_bytes=need + 1, batching=batching)
        g = _gen(7)
        eng.add(EngineRequest("s", [5, 6], None, 2, sc, generator=g))
        first = _codes(eng.run_until_idle())
        if evict:  # another session needs the memory: s's idle cache is evicted
            eng.add(EngineRequest("z", [9], None, 4, sc, generator=_gen(1)))
            eng.run_until_idle()
            assert "s" not in eng.pool
        eng.add(EngineRequest("s", [5, 6], first, 2, sc, generator=g))
        second = _codes(eng.run_until_idle())
        return torch.cat([first, second]), eng.pool.stats

    one = Engine(tiny_model, layout)
    one.add(EngineRequest("s", [5, 6], None, 4, sc, generator=_gen(7)))
    whole = _codes(one.run_until_idle())
    slid = window_start(2, window) > 0  # frame 2 moves the window: the warm cache is stale
    for batching in (True, False):
        warm, st = two_requests(False, batching)
        assert (st.hits, st.rebuilds) == ((0, 1) if slid else (1, 0)) and st.evictions == 0
        assert torch.equal(warm, whole)  # the warm fast path is the same computation
        cold, st = two_requests(True, batching)
        assert st.rebuilds == 1 and st.evictions >= 1
        assert torch.equal(cold, whole)


def test_changed_prompt_is_not_served_from_the_warm_cache(tiny_model, layout):
    sc = SamplerConfig(steps=2, cfg=2.0)
    eng = Engine(tiny_model, layout)
    eng.add(EngineRequest("s", [5, 6], None, 1, sc, generator=_gen(0)))
    frames = _codes(eng.run_until_idle())
    eng.add(EngineRequest("s", [7, 8], frames, 1, sc, generator=_gen(1)))
    got = _codes(eng.run_until_idle())
    assert eng.pool.stats.hits == 0 and eng.pool.stats.rebuilds == 1
    ref = generate(tiny_model, layout, [VideoRequest([7, 8], 1, frames, generator=_gen(1))], sc)
    assert torch.equal(got, ref[0][1:])


# -- 5. cancel -----------------------------------------------------------------------------------


@pytest.mark.parametrize("batching", [True, False])
def test_cancel_removes_a_session_between_steps(tiny_model, layout, batching):
    sc = SamplerConfig(steps=3, cfg=2.0)
    eng = Engine(tiny_model, layout, max_batch=2, batching=batching)
    eng.add(EngineRequest("a", [5], None, 3, sc, generator=_gen(0)))
    eng.add(EngineRequest("b", [6, 7], _given(1), 2, sc, generator=_gen(1)))
    eng.add(EngineRequest("w", [8], None, 1, sc, generator=_gen(2)))  # waits: max_batch=2
    events = eng.step()
    assert eng.cancel("a") and eng.cancel("w") and not eng.cancel("nobody")
    assert eng.stats()["running"] == 1 and eng.stats()["waiting"] == 0
    events += eng.run_until_idle()
    assert {e.session_id for e in events} == {"b"}
    alone = Engine(tiny_model, layout)
    alone.add(EngineRequest("b", [6, 7], _given(1), 2, sc, generator=_gen(1)))
    assert torch.equal(_codes(events), _codes(alone.run_until_idle()))
    assert not eng.pool.is_pinned("a")
    eng.add(EngineRequest("a", [5], None, 1, sc, generator=_gen(0)))  # a can come back
    assert [e.index for e in eng.run_until_idle()] == [0]
    assert eng.pool.stats.hits == 1  # its prefix cache was kept


# -- 6. scheduler and pool without a model -----------------------------------------------------


def test_scheduler_fifo_and_max_sessions():
    sch = Scheduler(max_sessions=2)
    for s in ("s1", "s2", "s3", "s4"):
        sch.add(s)
    assert sch.schedule() == ["s1", "s2"] and sch.admitted == ["s1", "s2"]
    assert sch.schedule() == ["s1", "s2"] and sch.admitted == []
    sch.finish("s1")
    assert sch.schedule() == ["s2", "s3"] and sch.admitted == ["s3"]
    assert sch.cancel("s4") and not sch.cancel("s4")
    assert sch.cancel("s2") and sch.schedule() == ["s3"]
    with pytest.raises(ValueError, match="already"):
        sch.add("s3")
    sch.finish("s3")
    assert not sch.has_work


def test_scheduler_admission_is_fifo_under_a_memory_budget():
    pool = KVPool(budget_bytes=10)
    sch = Scheduler(max_sessions=8, pool=pool)
    sch.add("big1", 6)
    sch.add("big2", 6)
    sch.add("small", 1)  # would fit, but must not overtake big2
    assert sch.schedule() == ["big1"]
    assert pool.bytes_used == 6 and pool.is_pinned("big1")
    sch.finish("big1")  # holds no cache: its entry disappears
    assert pool.bytes_used == 0
    assert sch.schedule() == ["big2", "small"]
    assert pool.bytes_used == 7
    sch.cancel("big2")
    assert pool.bytes_used == 1
    with pytest.raises(ValueError, match="budget"):
        sch.add("giant", 11)


def _cache(tokens: int) -> KVCache:
    c = KVCache(1, 1, 1, 2, capacity=tokens)  # 16 bytes per token
    c.advance(tokens)
    return c


def test_pool_lru_eviction_spares_pinned_and_own_cache():
    pool = KVPool(budget_bytes=100)
    for sid in ("a", "b", "c"):
        assert pool.reserve(sid, 32)
        pool.put(sid, _cache(2), key=sid)
        pool.release(sid)
    assert pool.bytes_used == 96 and pool.sessions() == ["a", "b", "c"]
    assert pool.get("a", key="a") is not None and pool.get("b", key="other") is None
    assert pool.stats.hits == 1 and pool.stats.misses == 1
    assert pool.reserve("c", 48)  # c's own cache is kept; b (least recent) goes
    assert "b" not in pool and "a" in pool and pool.stats.evictions == 1
    assert pool.bytes_used == 32 + 48
    assert not pool.can_admit(60) and not pool.reserve("d", 60)  # c is pinned
    assert "a" in pool  # nothing was evicted by the failed reservation
    assert pool.reserve("d", 52) and "a" not in pool
    assert pool.take("c") is not None and pool.take("c") is None
    pool.release("c")  # pinned without a cache: nothing to keep
    assert "c" not in pool
    pool.drop("d")
    assert len(pool) == 0 and pool.bytes_used == 0
    with pytest.raises(ValueError):
        KVPool(budget_bytes=0)


def test_batch_storage_keeps_rows_through_joins_and_leaves(tiny_cfg):
    from lumos.engine.engine import _BatchCache

    def filled(rows, length, seed):
        c = KVCache.for_model(tiny_cfg, rows, length)
        g = _gen(seed)
        c.k.copy_(torch.randn(c.k.shape, generator=g))
        c.v.copy_(torch.randn(c.v.shape, generator=g))
        c.advance([length - r for r in range(rows)])
        return c

    src = {"a": filled(2, 5, 0), "b": filled(1, 9, 1), "c": filled(2, 7, 2), "d": filled(2, 3, 3)}
    bc = _BatchCache(tiny_cfg, 8, torch.float32, "cpu")
    for sid, c in src.items():
        bc.attach(sid, c, capacity=12)

    def check():
        for sid, (a, n) in bc.slots.items():
            assert bc.view.lengths[a : a + n] == src[sid].lengths
            for r in range(n):
                m = src[sid].lengths[r]
                assert torch.equal(bc.view.k[:, a + r, :, :m], src[sid].k[:, r, :, :m])
                assert torch.equal(bc.view.v[:, a + r, :, :m], src[sid].v[:, r, :, :m])
        assert bc.view.batch == sum(n for _, n in bc.slots.values())

    check()
    out = bc.detach("a")  # same row count as the last session: d moves into the hole
    assert out.lengths == src["a"].lengths and torch.equal(
        out.k[:, 1, :, :4], src["a"].k[:, 1, :, :4]
    )
    check()
    bc.detach("b")  # one row: the tail shifts down
    check()
    bc.attach("a", out, capacity=20)  # grows the token capacity
    assert bc.view.capacity == 20
    check()
    for sid in list(bc.slots):
        bc.detach(sid)
    assert bc.view is None and bc.nbytes == 0


@pytest.mark.parametrize("rows", [[1], [0, 2, 4], [1, 2], [0, 1, 3]])
def test_cache_rows_write_through_to_the_base(rows):
    """`KVCache.rows`: a view for a slice or evenly spaced rows, else a gather; either way a
    forward's writes land in the base rows and the keys returned are exactly those rows'."""
    base = KVCache(2, 5, 1, 2, capacity=8)
    base.k.copy_(torch.arange(base.k.numel(), dtype=torch.float32).view_as(base.k))
    base.lengths = [3, 2, 3, 1, 3]
    sub = base.rows(rows)
    assert isinstance(sub, KVCache) == (rows != [0, 1, 3])  # a view unless unevenly spaced
    assert sub.lengths == [base.lengths[r] for r in rows]
    before = base.k.clone()
    new = torch.full((len(rows), 1, 2, 2), -1.0)  # [r, H, L, d]
    k, _ = sub.update(1, new, new)
    assert k.shape == (len(rows), 1, max(sub.lengths) + 2, 2)
    for i, r in enumerate(rows):
        n = base.lengths[r]
        assert torch.equal(base.k[1, r, :, n : n + 2], new[i])  # written through
        assert torch.equal(k[i, :, :n], before[1, r, :, :n])  # history intact
    untouched = [r for r in range(5) if r not in rows]
    assert torch.equal(base.k[:, untouched], before[:, untouched])
    assert torch.equal(base.k[0], before[0])  # only the layer written
    with pytest.raises(ValueError, match="ascending"):
        base.rows([2, 1])


def test_row_threads_split_rows_in_order_and_keep_autograd_modes():
    from lumos.sampler import RowThreads

    rt = RowThreads(3)
    seen = []

    def fn(sl):
        seen.append((sl.start, sl.stop, torch.is_inference_mode_enabled()))
        return torch.arange(sl.start, sl.stop)

    with torch.inference_mode():
        out = rt.run(fn, 7)
    assert torch.equal(torch.cat(out), torch.arange(7))
    assert sorted(seen) == [(0, 2, True), (2, 5, True), (5, 7, True)]
    assert len(rt.run(fn, 1)) == 1  # one row: no split
    with pytest.raises(ValueError):
        RowThreads(0)


def test_closing_an_engine_ends_its_row_threads(tiny_model, layout):
    import threading

    def pool_threads() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith("lumos-rows")}

    # Earlier tests' engines may still own pool threads, which end whenever those engines are
    # collected, so this follows the threads this engine starts, not a global count.
    before = pool_threads()
    sc = SamplerConfig(steps=2, cfg=2.0)
    eng = Engine(tiny_model, layout, row_threads=3)
    eng.add(EngineRequest("a", [5, 6], None, 1, sc, generator=_gen(0)))
    want = _codes(eng.run_until_idle())
    mine = pool_threads() - before
    assert mine  # two rows: one group here, one on a pool thread
    eng.close()
    for t in mine:
        t.join(timeout=5)
    assert not any(t.is_alive() for t in mine)
    eng.add(EngineRequest("b", [5, 6], None, 1, sc, generator=_gen(0)))
    assert torch.equal(_codes(eng.run_until_idle()), want)  # still steps, on one thread

"""ShardLoader: rank-aware batches from uint16 token shards, shard crossing, wrap, resume,
and the shuffled order (fresh every epoch, seeded, resumable)."""

import json

import numpy as np
import pytest
import torch

from common import UserError
from common.data import ShardLoader, shuffled_windows

B, T = 2, 4  # 8 tokens per rank per step


def make_shards(d, sizes, split="train", prefix="edufineweb", first=1):
    """Shard i holds 1000*(i+1) + arange(n): a token's value says which shard and position."""
    d.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(sizes):
        tokens = (1000 * (i + 1) + np.arange(n)).astype(np.uint16)
        np.save(d / f"{prefix}_{split}_{first + i:06d}.npy", tokens)
    return d


def where(x):
    """(shard, position) of a batch's first token."""
    v = x[0, 0].item()
    return v // 1000 - 1, v % 1000


def test_shift_shapes_and_dtype(tmp_path):
    loader = ShardLoader(make_shards(tmp_path, [100]), "train", B, T)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
    assert x.flatten().tolist() == list(range(1000, 1008))
    assert torch.equal(y, x + 1)  # y is x shifted by one token
    x2, _ = loader.next_batch()
    assert x2[0, 0].item() == 1008  # consecutive windows, no gap, no overlap


def test_ranks_read_disjoint_consecutive_windows(tmp_path):
    d = make_shards(tmp_path, [200])
    ranks = [ShardLoader(d, "train", B, T, rank=r, world_size=2) for r in range(2)]
    starts = {0: [], 1: []}
    for _ in range(5):
        for r, loader in enumerate(ranks):
            x, y = loader.next_batch()
            assert torch.equal(y, x + 1)
            starts[r].append(where(x)[1])
    assert starts[0] == [0, 16, 32, 48, 64] and starts[1] == [8, 24, 40, 56, 72]
    assert not set(starts[0]) & set(starts[1])  # no window read by both ranks
    union = sorted(starts[0] + starts[1])
    assert union == list(range(0, 80, B * T))  # together: one long run of windows
    # the two ranks' tokens together equal what one process reads with twice the batch
    one = ShardLoader(d, "train", 2 * B, T)
    [loader.reset() for loader in ranks]
    for _ in range(3):
        x0, x1, x = ranks[0].next_batch()[0], ranks[1].next_batch()[0], one.next_batch()[0]
        assert torch.equal(torch.cat([x0, x1]), x)


def test_crosses_shards_and_wraps(tmp_path):
    # shard sizes 30 and 20 with 8 tokens a step: shard 0 serves 3 steps (0, 8, 16; a 4th
    # would need token 32), shard 1 serves 2 (0, 8), then back to shard 0
    loader = ShardLoader(make_shards(tmp_path, [30, 20]), "train", B, T)
    seen = [where(loader.next_batch()[0]) for _ in range(7)]
    assert seen == [(0, 0), (0, 8), (0, 16), (1, 0), (1, 8), (0, 0), (0, 8)]


def test_state_dict_resumes_exactly(tmp_path):
    d = make_shards(tmp_path, [41, 27, 33])
    for world_size in (1, 2):
        for stop in range(0, 9):
            a = [ShardLoader(d, "train", B, T, r, world_size) for r in range(world_size)]
            for _ in range(stop):
                [loader.next_batch() for loader in a]
            states = [loader.state_dict() for loader in a]
            assert states[0] == states[-1] and set(states[0]) == {
                "epoch",
                "shard",
                "file",
                "window",
                "seed",
            }
            b = [ShardLoader(d, "train", B, T, r, world_size) for r in range(world_size)]
            for loader, state in zip(b, states):
                loader.load_state_dict(dict(state))
            for _ in range(10):  # through shard ends and the wrap
                for la, lb in zip(a, b):
                    xa, ya = la.next_batch()
                    xb, yb = lb.next_batch()
                    assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_reset_and_splits(tmp_path):
    make_shards(tmp_path, [50], split="val", first=0)
    make_shards(tmp_path, [50, 50], split="train")
    val = ShardLoader(tmp_path, "val", B, T)
    assert len(val.files) == 1 and val.files[0].name == "edufineweb_val_000000.npy"
    first = val.next_batch()[0]
    val.next_batch()
    val.reset()
    assert torch.equal(val.next_batch()[0], first)  # a validation pass starts over
    train = ShardLoader(tmp_path, "train", B, T)
    assert [p.name for p in train.files] == [
        "edufineweb_train_000001.npy",
        "edufineweb_train_000002.npy",
    ]


def test_errors(tmp_path):
    with pytest.raises(UserError, match="data dir not found.*common.fineweb"):
        ShardLoader(tmp_path / "nope", "train", B, T)
    make_shards(tmp_path / "v", [50], split="val", first=0)
    with pytest.raises(UserError, match="no 'train' shards"):
        ShardLoader(tmp_path / "v", "train", B, T)

    d = make_shards(tmp_path / "bad", [50, 50])
    (d / "edufineweb_train_000002.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(UserError, match="cannot read shard .*edufineweb_train_000002.npy"):
        ShardLoader(d, "train", B, T)
    good = (d / "edufineweb_train_000001.npy").read_bytes()
    (d / "edufineweb_train_000002.npy").write_bytes(good[:-20])  # cut off: a crashed copy
    with pytest.raises(UserError, match="cannot read shard .*edufineweb_train_000002.npy"):
        ShardLoader(d, "train", B, T)
    np.save(d / "edufineweb_train_000002.npy", np.zeros((10, 10), dtype=np.uint16))
    with pytest.raises(UserError, match="not a 1-D array"):
        ShardLoader(d, "train", B, T)

    d = make_shards(tmp_path / "small", [50, 16])  # one step of 2 ranks needs 8*2+1 = 17 tokens
    two = ShardLoader(d, "train", B, T, rank=1, world_size=2)  # a short last shard is skipped
    assert [p.name for p in two.files] == ["edufineweb_train_000001.npy"]
    assert len(ShardLoader(d, "train", B, T).files) == 2  # 16 tokens are enough for one rank
    with pytest.raises(UserError, match="every 'train' shard .* fewer tokens than one step"):
        ShardLoader(make_shards(tmp_path / "tiny", [12, 16]), "train", B, T, rank=1, world_size=2)

    one = ShardLoader(d, "train", B, T)  # resume a 1-rank run (both shards) on 2 ranks
    one.load_state_dict({"shard": 0, "pos": 0})
    assert one.state_dict()["file"] == "edufineweb_train_000001.npy"
    skipping = ShardLoader(make_shards(tmp_path / "skip", [16, 50]), "train", B, T, world_size=2)
    skipping.load_state_dict({"shard": 1, "pos": 0, "file": "edufineweb_train_000002.npy"})
    assert skipping.state_dict() == dict(
        epoch=0, shard=0, file="edufineweb_train_000002.npy", window=0, seed=0
    )

    loader = ShardLoader(d, "train", B, T)
    with pytest.raises(UserError, match="does not match the 2 shards"):
        loader.load_state_dict({"shard": 5, "pos": 0})


def test_state_from_a_bigger_step_moves_on(tmp_path):
    """A saved position that no longer leaves room for a step (the batch grew on resume)
    goes to the next shard, as next_batch would have."""
    loader = ShardLoader(make_shards(tmp_path, [40, 40]), "train", B, T)
    loader.load_state_dict({"shard": 0, "window": 8})  # (8 + 2) windows of 4 need 41 tokens
    assert loader.state_dict() == dict(
        epoch=0, shard=1, file="edufineweb_train_000002.npy", window=0, seed=0
    )
    assert where(loader.next_batch()[0]) == (1, 0)


@pytest.mark.parametrize("sizes", [[101, 77, 130], [50, 50, 50], [64, 200, 33]])
def test_one_process_with_accumulation_reads_what_two_processes_read(tmp_path, sizes):
    """1 process x 2 micro-steps == 2 processes x 1 for shards that divide unevenly: shards
    change only between optimizer steps, so both runs skip the same tail of each shard."""
    d = make_shards(tmp_path, sizes)
    step = 2 * B * T  # the optimizer step's tokens
    one = ShardLoader(d, "train", B, T, step_tokens=step)
    two = [ShardLoader(d, "train", B, T, rank=r, world_size=2, step_tokens=step) for r in (0, 1)]
    shards_seen = set()
    for _ in range(40):  # several passes over every shard, wrap included
        a = torch.cat([one.next_batch()[0] for _ in range(2)])  # micro-steps 0 and 1
        b = torch.cat([loader.next_batch()[0] for loader in two])  # ranks 0 and 1
        assert torch.equal(a, b)
        shards_seen.add(where(a)[0])
        assert one.state_dict() == two[0].state_dict() == two[1].state_dict()
    assert shards_seen == set(range(len(sizes)))


def test_step_tokens_must_be_a_multiple_of_the_micro_step(tmp_path):
    with pytest.raises(UserError, match="not a multiple of B\\*T\\*GPUs"):
        ShardLoader(make_shards(tmp_path, [100]), "train", B, T, step_tokens=12)


# ---- shuffled order (issue 20): every window once per epoch, seeded, resumable -------------


def windows_of(x):
    """(shard, start) of each row of a batch."""
    return [(v // 1000 - 1, v % 1000) for v in x[:, 0].tolist()]


def test_shuffled_epochs_read_every_window_once_in_a_new_order(tmp_path):
    """2 ranks, 3 shards, 3 epochs: each epoch permutes the shards and, inside each, the
    windows (T+1 consecutive tokens); no window twice in an epoch, none read by both ranks,
    at most one step's windows skipped per shard; the offset moves the window boundaries."""
    sizes = [101, 77, 130]
    d = make_shards(tmp_path, sizes)
    step = 2 * B * T  # one micro-step of 2 ranks: 4 windows
    ranks = [
        ShardLoader(d, "train", B, T, r, 2, step, shuffle=shuffled_windows, seed=5) for r in (0, 1)
    ]
    epochs = {}  # epoch -> shard order and the windows read
    while ranks[0].epoch < 3:
        epoch, shard = ranks[0].epoch, ranks[0].shard
        seen = epochs.setdefault(epoch, {"order": [], "windows": []})
        if not seen["order"] or seen["order"][-1] != shard:
            seen["order"].append(shard)
        for loader in ranks:
            x, y = loader.next_batch()
            assert torch.equal(y, x + 1) and torch.equal(x[:, 1:], x[:, :-1] + 1)  # T+1 in a row
            seen["windows"] += windows_of(x)
    orders = [tuple(epochs[e]["order"]) for e in range(3)]
    assert all(sorted(o) == [0, 1, 2] for o in orders) and len(set(orders)) > 1
    for e in range(3):
        got = epochs[e]["windows"]
        assert len(got) == len(set(got))  # no window twice in an epoch, across both ranks
        for shard, n in enumerate(sizes):
            starts = sorted(s for k, s in got if k == shard)
            offset = starts[0] % T
            assert offset < T and all(s % T == offset for s in starts)  # one grid per epoch
            left = (n - 1 - offset) // T - len(starts)  # windows of the shard not read
            assert 0 <= left < step // T  # less than one step's worth
    first = [s for k, s in epochs[0]["windows"] if k == epochs[0]["order"][0]]
    assert first != sorted(first)  # shuffled, not in order
    grids = {
        (e, k): {s % T for kk, s in epochs[e]["windows"] if kk == k}
        for e in range(3)
        for k in range(3)
    }
    assert len({min(g) for g in grids.values()}) > 1  # the offset moves between epochs


def test_shuffled_is_seeded_and_resumes_exactly_across_epochs(tmp_path):
    d = make_shards(tmp_path, [41, 27, 33])

    def loader(seed=1, world_size=1, rank=0):
        return ShardLoader(d, "train", B, T, rank, world_size, shuffle=shuffled_windows, seed=seed)

    def run(a, n):
        return [a.next_batch()[0] for _ in range(n)]

    ref = run(loader(), 30)  # 30 steps: about 4 epochs of the 3 shards
    assert all(torch.equal(a, b) for a, b in zip(ref, run(loader(), 30)))  # same seed
    assert not all(torch.equal(a, b) for a, b in zip(ref, run(loader(seed=2), 30)))
    for stop in (0, 3, 7, 11, 16):
        a = loader()
        run(a, stop)
        state = a.state_dict()
        assert json.loads(json.dumps(state)) == state  # plain types: weights_only loads them
        b = loader(seed=99)  # the seed comes from the state
        b.load_state_dict(state)
        assert all(torch.equal(x, y) for x, y in zip(ref[stop:], run(b, 30 - stop)))
    assert a.state_dict()["epoch"] >= 1


@pytest.mark.parametrize("sizes", [[101, 77, 130], [64, 200, 33]])
def test_shuffled_one_process_with_accumulation_reads_what_two_processes_read(tmp_path, sizes):
    d = make_shards(tmp_path, sizes)
    step = 2 * B * T
    one = ShardLoader(d, "train", B, T, step_tokens=step, shuffle=shuffled_windows, seed=7)
    two = [
        ShardLoader(d, "train", B, T, r, 2, step, shuffle=shuffled_windows, seed=7) for r in (0, 1)
    ]
    for _ in range(60):  # several epochs
        a = torch.cat([one.next_batch()[0] for _ in range(2)])  # micro-steps 0 and 1
        x0, x1 = (loader.next_batch()[0] for loader in two)  # ranks 0 and 1
        assert torch.equal(a, torch.cat([x0, x1]))
        assert not set(windows_of(x0)) & set(windows_of(x1))  # ranks never share a window
        assert one.state_dict() == two[0].state_dict() == two[1].state_dict()


def test_shuffle_needs_room_for_the_offset(tmp_path):
    """A shard must hold one step + T tokens when shuffling (the offset takes up to T-1)."""
    d = make_shards(tmp_path, [50, 9, 11])  # one step: 8 tokens + 1; + T-1 = 3 more: 12
    assert len(ShardLoader(d, "train", B, T).files) == 3
    assert len(ShardLoader(d, "train", B, T, shuffle=shuffled_windows).files) == 1


def test_window_loader_reads_a_text_as_07_reads_one_shuffled_shard(tmp_path):
    """09's loader for a text: every window once per epoch, a fresh order each epoch, the same
    windows (and order) ShardLoader gives one shard with the shuffle, targets one token on."""
    from common.data import WindowLoader

    tokens = list(range(1000, 1203))  # a token's value says where it is
    text = WindowLoader(tokens, B, T, seed=3)
    shard = ShardLoader(
        make_shards(tmp_path, [203]), "train", B, T, shuffle=shuffled_windows, seed=3
    )
    per_epoch = (203 - 1 - (T - 1)) // T // B  # whole batches, whatever the epoch's offset
    epochs, x_first = [], None
    for _ in range(3):
        starts = []
        for _ in range(per_epoch):
            x, y = text.next_batch()
            assert x.shape == y.shape == (B, T) and torch.equal(y[:, :-1], x[:, 1:])
            assert torch.equal(y[:, -1], x[:, -1] + 1)  # the target is the next token
            x_first = x if x_first is None else x_first
            sx, _ = shard.next_batch()
            assert torch.equal(x, sx.long())  # the same windows as 07's shuffled shard
            starts += (x[:, 0] - 1000).tolist()
        assert len(set(starts)) == len(starts)  # no window twice in an epoch
        assert len({s % T for s in starts}) == 1  # one offset per epoch
        epochs.append(starts)
        while text.i + B <= len(text.starts):  # the rest of this epoch (at most a batch)
            text.next_batch(), shard.next_batch()
    assert epochs[0] != epochs[1] != epochs[2]  # a fresh order each epoch
    first = {seed: WindowLoader(tokens, B, T, seed=seed).next_batch()[0] for seed in (3, 4)}
    assert torch.equal(first[3], x_first) and not torch.equal(first[3], first[4])  # seeded
    with pytest.raises(UserError, match="shorter than one batch"):
        WindowLoader(tokens[: B * T + 2], B, T)

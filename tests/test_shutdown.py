"""Issue #26: every way out of a distributed run ends its process group and its process with a
meaningful exit code, and nothing aborts at exit (common.distributed.ddp_exit).

In this process, with a one-rank gloo group: the end, SystemExit (preemption's 75) and an
error each give their exit code, with destroy_process_group where every rank is there and no
collective call where one rank may be alone. With torchrun: a UserError on one rank, and a
peer killed with kill -9, end every rank within seconds, the failing rank (or the survivor)
with exit code 1 (the finished, restarted run and preemption's 75 are test_faults' restart
and SIGTERM tests). A rank that
has failed on its own, or that torchrun stopped with SIGTERM once another had failed, are
both meaningful ends; an abort (-6, `terminate called`) or a hang never is."""

import os
import re
import signal
import sys

import pytest
import torch.distributed as dist
from conftest import ROOT, load_stage
from test_faults import sigusr1_during_step_1, small_07, torchrun_07

from common import UserError, cli
from common.checkpoint import RunLock
from common.distributed import ddp_exit

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads workers from /proc")


class Exited(Exception):
    """What os._exit(code) raises here instead of ending pytest."""


@pytest.fixture
def group(monkeypatch):
    """A one-rank gloo process group in this process, as torchrun's worker RANK 0 (os._exit
    raises Exited(code)); destroyed afterwards if the code under test left it."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(sys, "excepthook", cli._excepthook)  # as parse_args sets it
    monkeypatch.setattr(os, "_exit", lambda code: (_ for _ in ()).throw(Exited(code)))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_code(body):
    """Run body() inside ddp_exit(); the code it exits with."""
    with pytest.raises(Exited) as e:
        with ddp_exit():
            body()
    return e.value.args[0]


def test_the_end_and_systemexit_destroy_the_group_and_exit_with_their_code(group):
    assert exit_code(lambda: None) == 0
    assert not dist.is_initialized()  # destroy_process_group ran
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    assert exit_code(lambda: sys.exit(75)) == 75  # preemption: every rank, after a barrier
    assert not dist.is_initialized()


def test_an_error_on_one_rank_is_one_line_exit_1_and_no_collective_call(group, capfd):
    def refuse():
        raise UserError("--out is taken")

    assert exit_code(refuse) == 1
    err = capfd.readouterr().err.splitlines()  # torch prefixes a rank's stderr: [rank0]:
    assert len(err) == 1 and err[0].endswith("error: --out is taken"), err
    assert dist.is_initialized()  # not destroyed: the peers may be gone (the OS ends it)


def test_a_checkpoint_being_written_is_finished_before_the_exit(group):
    """os._exit would cut a background write short: ddp_exit joins the checkpoint writer
    first, on every path (here a UserError, the path that makes no collective call), and no
    other thread (a ThreadPoolExecutor's idle worker would never end)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    written, go = [], threading.Event()
    pool = ThreadPoolExecutor(1)
    pool.submit(go.wait)  # a non-daemon thread that ends only when the test says so

    def write():
        go.wait(timeout=60)  # released only after ddp_exit has begun joining
        written.append("ckpt_000004.pt")

    writer = threading.Thread(target=write, name="checkpoint writer ckpt_000004.pt")
    writer.start()

    def fail():
        threading.Timer(0.0, go.set).start()  # the writer finishes while ddp_exit waits for it
        raise UserError("a rank failed")

    assert exit_code(fail) == 1
    assert written == ["ckpt_000004.pt"] and not writer.is_alive()
    pool.shutdown()


def test_a_rank_leaving_with_75_ignores_further_stop_signals(shards, tmp_path, monkeypatch):
    """Under torchrun, once one rank has left with 75 torchrun sends SIGTERM to the others,
    which are leaving too: Run.stop then sets stop signals to be ignored rather than put
    back, so that SIGTERM cannot turn their 75 into -15. (In this process, as a one-rank
    group; without a process group the handlers are put back: test_faults.)"""
    from common import run as run_module

    s07 = load_stage("07_ddp_fineweb")
    sigusr1_during_step_1(monkeypatch)
    before = {sig: signal.getsignal(sig) for sig in run_module.STOP_SIGNALS}
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(SystemExit) as e:
            s07.main(small_07(s07, shards, tmp_path / "run"))
        assert e.value.code == 75 and not dist.is_initialized()  # Run.stop destroyed it
        assert {signal.getsignal(sig) for sig in before} == {signal.SIG_IGN}
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        if dist.is_initialized():
            dist.destroy_process_group()


def test_every_stage_that_runs_under_torchrun_exits_through_ddp_exit():
    """A stage that joins a process group (setup_ddp) runs its main inside ddp_exit: 08
    did not, and one of its two ranks aborted at exit (`terminate called without an active
    exception`) in a fresh-clone CI run, as 07's did before ddp_exit."""
    stages = sorted(ROOT.glob("[0-9][0-9]_*.py"))
    under_torchrun = [p for p in stages if "setup_ddp(" in p.read_text()]
    assert [p.name for p in under_torchrun] == ["07_ddp_fineweb.py", "08_hellaswag.py"]
    for p in under_torchrun:
        main_block = p.read_text().split('if __name__ == "__main__":')[1]
        assert "with ddp_exit():" in main_block, p.name


def test_without_torchrun_it_changes_nothing(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(UserError, match="as raised"):
        with ddp_exit():
            raise UserError("as raised")
    with pytest.raises(SystemExit) as e:
        with ddp_exit():
            sys.exit(75)
    assert e.value.code == 75


def exit_codes(text):
    """The exit code of every failed worker in torchrun's summary ("exitcode  : 1 (pid: 7)")."""
    return re.findall(r"exitcode\s+: (-?\d+) \(pid", text)


def rank_exit_codes(text):
    """{rank: exit code} of every failed worker in torchrun's summary."""
    found = re.findall(r"rank\s+: (\d+) \(local_rank: \d+\)\s+exitcode\s+: (-?\d+)", text)
    return {int(rank): code for rank, code in found}


@pytest.fixture(scope="module")
def env(cache_env):
    return {**cache_env, "OMP_NUM_THREADS": "1"}  # two workers on two cores


def test_a_user_error_on_one_rank_ends_every_rank_with_exit_1(shards, env, tmp_path):
    """--out is locked (by this process): rank 0 alone, the one writer, is refused with one
    line and exits 1. Rank 1 waits in its first collective until rank 0's connections close,
    then fails too (exit 1), unless torchrun, which sends SIGTERM to the other workers once
    one has failed, reaches it first (-15, before its signal handlers are set): which one
    comes first is a race between gloo and torchrun's monitor, and both end it at once (the
    watchdog's limit is far below gloo's 30-minute timeout). Neither ever aborts."""
    out = tmp_path / "run"
    lock = RunLock(out).acquire()
    try:
        rc, text = torchrun_07(shards, out, env, 0, lambda line, pids: None, limit=120)
    finally:
        lock.release()
    assert rc != 0 and text.count(f"error: {out} is in use") == 1, text
    codes = rank_exit_codes(text)
    assert codes.get(0) == "1" and codes.get(1) in ("1", "-15"), text  # no abort (-6)
    assert "terminate called" not in text and "SIGABRT" not in text


def test_a_dead_peer_ends_the_other_rank_with_exit_1(shards, env, tmp_path):
    """kill -9 of rank 1 after step 5, no restarts: rank 0's next collective fails at once
    (the connection closed) and it exits 1, without aborting; torchrun reports rank 1's -9."""
    killed = []

    def act(line, pids):
        if not killed and line.startswith("step     5/"):
            os.kill(pids()[1], signal.SIGKILL)
            killed.append(1)

    rc, text = torchrun_07(shards, tmp_path / "run", env, 0, act, limit=120)
    assert rc != 0 and killed, text
    assert sorted(exit_codes(text)) == ["-9", "1"], text  # rank 1 killed, rank 0 exit 1
    assert "terminate called" not in text and "SIGABRT" not in text

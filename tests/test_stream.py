"""Boundary-activation streams between real processes (gloo): values arrive intact and in order
through a chain of ranks, with and without the student tensor, an answer (yes/no, no tensors) is a
message of its own, and a desync is an error."""

from pathlib import Path

import pytest
import torch

from dist_helpers import run_ranks

pytestmark = pytest.mark.dist


def _chain(rank: int, out_dir: str, steps: int, skew: bool) -> None:
    from mrem_dist.distributed import init_distributed, teardown_distributed
    from mrem_dist.engine.stream import StreamReceiver, StreamSender

    ctx = init_distributed("cpu", timeout_s=30)
    try:
        last = ctx.world_size - 1
        send = StreamSender(rank + 1, depth=2) if rank < last else None
        recv = StreamReceiver(rank - 1, ctx.device) if rank > 0 else None
        seen = []
        for t in range(steps):
            batch_index = (t * 3) % 5
            if recv is None:
                teacher = torch.full((2, 4, 8), float(t))
                student = torch.full((2, 4, 8), float(-t)) if t % 2 else None
            else:
                expect_step = t + 1 if (skew and rank == last) else t
                teacher, student = recv.recv(expect_step, batch_index)
                seen.append((teacher.mean().item(), None if student is None else student.mean().item()))
                teacher = teacher + 1  # this rank's "module"
                student = None if student is None else student - 1
            if send is not None:
                send.send(t, batch_index, teacher, student)
        if send is not None:
            send.flush()
        with open(f"{out_dir}/{rank}.txt", "w") as f:
            f.write(repr(seen))
    except Exception as e:
        # Which rank fails first is a race (its peers then lose the connection): record each.
        with open(f"{out_dir}/{rank}.err", "w") as f:
            f.write(str(e))
        raise
    finally:
        teardown_distributed()


def test_three_rank_chain_delivers_every_step_in_order(tmp_path):
    run_ranks(_chain, 3, str(tmp_path), 6, False)
    last = eval((tmp_path / "2.txt").read_text())
    # Rank 2 sees rank 1's output: teacher t + 1; the student (odd steps only) -t - 1.
    assert last == [(t + 1.0, None if t % 2 == 0 else float(-t - 1)) for t in range(6)]
    middle = eval((tmp_path / "1.txt").read_text())
    assert [m[0] for m in middle] == [t + 0.0 for t in range(6)]


def test_out_of_step_stream_is_an_error(tmp_path):
    with pytest.raises(Exception):
        run_ranks(_chain, 3, str(tmp_path), 2, True)
    # The receiving rank names the mismatch (its peers may be terminated before they notice).
    assert "out of step: expected step 1 (batch 0), received step 0 (batch 0)" in (tmp_path / "2.err").read_text()


def _answers(rank: int, out_dir: str, wrong: bool) -> None:
    from mrem_dist.distributed import init_distributed, teardown_distributed
    from mrem_dist.engine.stream import StreamReceiver, StreamSender

    ctx = init_distributed("cpu", timeout_s=30)
    try:
        if rank == 0:
            send = StreamSender(1, depth=1)  # a full queue waits for the answer to be read too
            send.send(0, 0, torch.ones(1, 2, 3))
            send.send_answer(1, True, ctx.device)
            send.send_answer(2, False, ctx.device)
            send.flush()
        else:
            recv = StreamReceiver(0, ctx.device)
            got = [recv.recv(0, 0)[0].sum().item(), recv.recv_answer(1)]
            try:
                got.append(recv.recv(2, 2) if wrong else recv.recv_answer(2))
            except RuntimeError as e:
                got.append(str(e))
            (Path(out_dir) / "1.txt").write_text(repr(got))
    finally:
        teardown_distributed()


@pytest.mark.parametrize("wrong", [False, True], ids=["in-step", "an-answer-where-tensors-were-due"])
def test_an_answer_is_a_message_of_its_own_and_checked_like_one(tmp_path, wrong):
    run_ranks(_answers, 2, str(tmp_path), wrong)
    got = eval((tmp_path / "1.txt").read_text())
    assert got[:2] == [6.0, True]
    assert got[2] == ("stream from rank 0 is out of step: expected step 2 (batch 2), received step 2 (batch -1); "
                      "both ranks must use the same data, seed and steps" if wrong else False)

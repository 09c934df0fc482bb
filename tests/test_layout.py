"""The parallel layout: the one place that turns rank numbers into stages, replicas and peers."""

import pytest

from mrem_dist.layout import ParallelLayout, stage_modules


def test_stage_modules_spread_partitions_contiguously():
    assert stage_modules(4, 4) == (range(0, 1), range(1, 2), range(2, 3), range(3, 4))
    assert stage_modules(5, 2) == (range(0, 3), range(3, 5))
    assert stage_modules(6, 1) == (range(0, 6),)
    with pytest.raises(ValueError, match=r"3 ranks but only 2 module partitions.*--nproc_per_node=2"):
        stage_modules(2, 3)


def test_a_pipeline_of_three_stages_knows_its_neighbours():
    layouts = [ParallelLayout.build(r, 3, 5) for r in range(3)]
    assert [list(lay.modules) for lay in layouts] == [[0, 1], [2, 3], [4]]
    assert [(lay.prev_rank, lay.next_rank) for lay in layouts] == [(None, 1), (0, 2), (1, None)]
    assert [(lay.stage, lay.replica, lay.is_leader) for lay in layouts] == [(0, 0, True), (1, 0, True), (2, 0, True)]
    assert [lay.is_first_stage for lay in layouts] == [True, False, False]
    assert [lay.is_last_stage for lay in layouts] == [False, False, True]
    assert layouts[0].is_coordinator and not layouts[2].is_coordinator
    assert layouts[1].leaders == [0, 1, 2] and layouts[1].rows(8) == slice(0, 8) and layouts[1].batches(3) == [0, 1, 2]


def test_one_process_holds_every_module():
    single = ParallelLayout.single(4)
    assert single.stages == 1 and list(single.modules) == [0, 1, 2, 3]
    assert single.prev_rank is None and single.next_rank is None and single.is_coordinator


def test_replicas_of_a_stage_pair_up_with_the_same_replica_of_its_neighbours():
    # 2 stages x 2 replicas: ranks 0, 1 hold modules 0-1, ranks 2, 3 modules 2-3.
    layouts = [ParallelLayout.build(r, 4, 4, replicas=2) for r in range(4)]
    assert [(lay.stage, lay.replica, lay.is_leader) for lay in layouts] == [(0, 0, True), (0, 1, False), (1, 0, True),
                                                                          (1, 1, False)]
    assert [list(lay.modules) for lay in layouts] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [(lay.prev_rank, lay.next_rank) for lay in layouts] == [(None, 2), (None, 3), (0, None), (1, None)]
    assert layouts[3].leaders == [0, 2] and layouts[3].ranks_of_stage(1) == range(2, 4)
    # Replica k trains on share k of a batch's rows and scores every second batch from k.
    assert [lay.rows(5) for lay in layouts[:2]] == [slice(0, 2), slice(2, 5)]
    assert [lay.batches(5) for lay in layouts[:2]] == [[0, 2, 4], [1, 3]]


def test_replicas_are_derived_when_there_are_more_ranks_than_modules():
    assert ParallelLayout.build(0, 4, 4).replicas == 1  # method.replicas=0, the default: derived
    assert ParallelLayout.build(0, 4, 4, replicas=0).replicas == 1
    assert ParallelLayout.build(0, 8, 4, replicas=0).replicas == 2
    derived = ParallelLayout.build(5, 6, 3, replicas=0)
    assert (derived.stages, derived.replicas, derived.stage, derived.replica) == (3, 2, 2, 1)
    assert ParallelLayout.build(0, 2, 4, replicas=2).stages == 1  # every module on one stage, 2 replicas
    with pytest.raises(ValueError, match=r"6 ranks do not split into stages x replicas of 4 .*method.modules=6"):
        ParallelLayout.build(0, 6, 4, replicas=0)


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match=r"3 ranks are not stages x replicas with method.replicas=2"):
        ParallelLayout.build(0, 3, 4, replicas=2)
    with pytest.raises(ValueError, match=r"method.replicas=-1 must be >= 0"):
        ParallelLayout.build(0, 2, 4, replicas=-1)
    with pytest.raises(ValueError, match=r"4 stages \(8 ranks / method.replicas=2\) but only 2 .*method.replicas=4"):
        ParallelLayout.build(0, 8, 2, replicas=2)
    with pytest.raises(ValueError, match="rank 3 is outside a world of 2"):
        ParallelLayout.build(3, 2, 4)

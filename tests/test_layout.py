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
    assert layouts[1].leaders == [0, 1, 2] and layouts[1].stage_group is None


def test_one_process_holds_every_module():
    single = ParallelLayout.single(4)
    assert single.stages == 1 and list(single.modules) == [0, 1, 2, 3]
    assert single.prev_rank is None and single.next_rank is None and single.is_coordinator


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="replicas of a stage are not supported yet"):
        ParallelLayout.build(0, 4, 4, replicas=2)
    with pytest.raises(ValueError, match="rank 3 is outside a world of 2"):
        ParallelLayout.build(3, 2, 4)

"""The on-device episode sampler: shapes, labels, determinism, resumable state, errors."""

import pytest
import torch
from helpers.data import tiny_data_config

from metalearn.data import ClassSplit, EpisodeSampler, load_split
from metalearn.errors import MetalearnError


def labelled_split(num_classes=10, per_class=20, uneven=False) -> ClassSplit:
    """Every image's pixels encode (class, index) so episodes can be traced back."""
    counts = [per_class - (c % 3 if uneven else 0) for c in range(num_classes)]
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    within = torch.cat([torch.arange(n) for n in counts])
    images = torch.zeros(len(labels), 1, 28, 28, dtype=torch.uint8)
    images[:, 0, 0, 0] = labels.to(torch.uint8)
    images[:, 0, 0, 1] = within.to(torch.uint8)
    # shuffle so the sampler cannot rely on images being grouped by class
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    return ClassSplit(images[order], labels[order], "labelled")


def decode(x: torch.Tensor):
    pixels = (x[..., 0, 0, :2] * 255).round().long()
    return pixels[..., 0], pixels[..., 1]  # class, index within class


def test_shapes_and_labels():
    sampler = EpisodeSampler(labelled_split(), ways=5, shots=2, queries=3, device="cpu", seed=0)
    ep = sampler.sample(4)
    assert ep.support.shape == (4, 10, 1, 28, 28) and ep.query.shape == (4, 15, 1, 28, 28)
    assert ep.support.dtype == torch.float32 and 0 <= ep.support.min() and ep.support.max() <= 1
    assert ep.support_labels.tolist() == [[0, 0, 1, 1, 2, 2, 3, 3, 4, 4]] * 4
    assert ep.query_labels[0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]


@pytest.mark.parametrize("uneven", [False, True])
def test_tasks_are_consistent_and_images_distinct(uneven):
    sampler = EpisodeSampler(labelled_split(uneven=uneven), ways=5, shots=2, queries=3, device="cpu", seed=1)
    ep = sampler.sample(50)
    s_cls, s_idx = decode(ep.support)
    q_cls, q_idx = decode(ep.query)
    for t in range(50):
        # one dataset class per task label, the same in support and query
        mapping = {}
        for cls, label in zip(
            torch.cat([s_cls[t], q_cls[t]]).tolist(),
            torch.cat([ep.support_labels[t], ep.query_labels[t]]).tolist(),
            strict=False,
        ):
            assert mapping.setdefault(label, cls) == cls
        assert len(set(mapping.values())) == 5  # distinct classes
        # no image appears twice in a task (support and query disjoint)
        pairs = list(
            zip(torch.cat([s_cls[t], q_cls[t]]).tolist(), torch.cat([s_idx[t], q_idx[t]]).tolist(), strict=False)
        )
        assert len(set(pairs)) == len(pairs)
        if uneven:  # never an index beyond a class's own images
            counts = labelled_split(uneven=True).class_counts()
            assert all(i < counts[c] for c, i in pairs)


def test_all_classes_and_images_get_drawn():
    sampler = EpisodeSampler(labelled_split(), ways=5, shots=1, queries=1, device="cpu", seed=2)
    ep = sampler.sample(400)
    cls, idx = decode(torch.cat([ep.support, ep.query], dim=1))
    assert set(cls.flatten().tolist()) == set(range(10))
    assert set(idx.flatten().tolist()) == set(range(20))


def test_same_seed_same_episodes_and_state_resumes():
    a = EpisodeSampler(labelled_split(), 5, 1, 2, "cpu", seed=7)
    b = EpisodeSampler(labelled_split(), 5, 1, 2, "cpu", seed=7)
    c = EpisodeSampler(labelled_split(), 5, 1, 2, "cpu", seed=8)
    first = a.sample(8)
    assert torch.equal(first.support, b.sample(8).support)
    assert not torch.equal(first.support, c.sample(8).support)
    state = a.state_dict()
    expected = a.sample(8)
    b.load_state_dict(state)
    assert torch.equal(b.sample(8).query, expected.query)
    # the training stream is episodes 0, 1, 2, ... of the seed
    assert torch.equal(a.episodes(0, 8).support, first.support)


def test_episode_i_is_one_task_whatever_the_batching():
    """Drawn 1, 5, 32 or 600 at a time, or as the first 600 of 1000: the same 600 tasks."""
    sampler = EpisodeSampler(labelled_split(), 5, 1, 3, "cpu", seed=3)
    reference = sampler.episode_ids(0, 600)
    assert len({tuple(t.flatten().tolist()) for t in reference}) > 590  # tasks, not one task repeated
    for size in (1, 5, 32, 600):
        chunks = [sampler.episode_ids(start, min(size, 600 - start)) for start in range(0, 600, size)]
        assert torch.equal(torch.cat(chunks), reference), size
    assert torch.equal(sampler.episode_ids(0, 1000)[:600], reference)
    # the images gathered are those ids' images
    ep = sampler.episodes(10, 3)
    images = torch.cat([ep.support.unflatten(1, (5, 1)), ep.query.unflatten(1, (5, 3))], dim=2)
    expected = sampler.images[reference[10:13]].float() / 255
    assert torch.equal(images, expected)


def test_training_tasks_do_not_depend_on_the_meta_batch_size():
    a = EpisodeSampler(labelled_split(), 5, 1, 2, "cpu", seed=1)
    b = EpisodeSampler(labelled_split(), 5, 1, 2, "cpu", seed=1)
    by_two = torch.cat([a.sample_ids(2) for _ in range(6)])
    by_four = torch.cat([b.sample_ids(4) for _ in range(3)])
    assert torch.equal(by_two, by_four)


def test_episodes_depend_on_seed_and_part_but_not_on_the_device():
    split = labelled_split()
    ids = EpisodeSampler(split, 5, 1, 2, "cpu", seed=0).episode_ids(0, 50)
    # "meta" stands in for a GPU here: the ids are drawn on the CPU whatever the device
    assert torch.equal(EpisodeSampler(split, 5, 1, 2, "meta", seed=0).episode_ids(0, 50), ids)
    assert not torch.equal(EpisodeSampler(split, 5, 1, 2, "cpu", seed=1).episode_ids(0, 50), ids)
    other_part = ClassSplit(split.images, split.labels, split.name, part="val")
    assert not torch.equal(EpisodeSampler(other_part, 5, 1, 2, "cpu", seed=0).episode_ids(0, 50), ids)


def test_impossible_tasks_say_what_is_possible():
    with pytest.raises(MetalearnError, match=r"task.ways <= 10"):
        EpisodeSampler(labelled_split(), ways=11, shots=1, queries=1, device="cpu", seed=0)
    with pytest.raises(MetalearnError, match=r"task.shots \+ task.queries <= 20"):
        EpisodeSampler(labelled_split(), ways=5, shots=5, queries=16, device="cpu", seed=0)


def task_keys(ep):
    """Each task as a hashable tuple of its images' (class, index) codes."""
    cls, idx = decode(torch.cat([ep.support, ep.query], dim=1))
    return [tuple(zip(c.tolist(), i.tolist(), strict=False)) for c, i in zip(cls, idx, strict=False)]


def test_replay_mixes_earlier_tasks_into_each_batch():
    sampler = EpisodeSampler(labelled_split(), 5, 1, 2, "cpu", seed=0, replay_fraction=0.25, replay_size=6)
    seen = []
    first = task_keys(sampler.sample(8))
    assert len(set(first)) == 8  # nothing to replay yet: all fresh
    seen += first
    for _ in range(5):
        batch = task_keys(sampler.sample(8))
        fresh, replayed = batch[:6], batch[6:]
        assert len(replayed) == 2
        recent = seen[-6:]  # the buffer keeps the last 6 tasks
        assert all(task in recent for task in replayed)
        seen += fresh


def test_replay_is_deterministic_and_resumes_exactly():
    def make():
        return EpisodeSampler(
            labelled_split(),
            5,
            1,
            2,
            "cpu",
            seed=4,
            replay_fraction=0.5,
            replay_size=5,
        )

    a, b = make(), make()
    for _ in range(3):
        assert torch.equal(a.sample(4).support, b.sample(4).support)
    state = a.state_dict()
    expected = [a.sample(4).query for _ in range(3)]
    c = make()
    c.load_state_dict(state)
    assert all(torch.equal(c.sample(4).query, e) for e in expected)


def test_replay_settings_are_checked():
    with pytest.raises(MetalearnError, match="train.replay.fraction"):
        EpisodeSampler(labelled_split(), 5, 1, 1, "cpu", seed=0, replay_fraction=1.0, replay_size=10)
    with pytest.raises(MetalearnError, match="train.replay.size"):
        EpisodeSampler(labelled_split(), 5, 1, 1, "cpu", seed=0, replay_fraction=0.5, replay_size=0)


def test_episodes_gathered_in_host_memory_equal_those_gathered_on_the_device(tiny_data):
    """The path a GPU takes for a dataset larger than its share of the GPU's memory, run on the CPU."""
    split = load_split(tiny_data_config(tiny_data), "train")
    here = EpisodeSampler(split, 5, 1, 3, "cpu", seed=4, images_on_device=True)
    host = EpisodeSampler(split, 5, 1, 3, "cpu", seed=4, images_on_device=False)
    for a, b in zip(here.sample(3), host.sample(3), strict=False):
        assert torch.equal(a, b)
    assert torch.equal(here.sample_images(7).images, host.sample_images(7).images)


def test_images_go_to_a_gpu_only_within_their_share_of_its_free_memory(monkeypatch):
    from metalearn.data import sampler as module

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (4000, 8000))  # bytes free, total
    cuda = torch.device("cuda")
    assert module.images_fit(torch.zeros(1000, dtype=torch.uint8), cuda)  # 1000 <= 0.25 * 4000
    assert not module.images_fit(torch.zeros(1001, dtype=torch.uint8), cuda)
    assert module.images_fit(torch.zeros(10**6, dtype=torch.uint8), torch.device("cpu"))

"""Self-critical sequence training: its CIDEr-D reward, its policy gradient and the phase in a real run."""

import json

import pytest
import torch
from pycocoevalcap.cider.cider import Cider

from captioner import Captioner
from captioner.data.datasets import load_dataset
from captioner.data.vocab import END, START, tokenize
from captioner.evaluation.hallucination import ObjectTable
from captioner.model.decoder import DecoderConfig
from captioner.model.ensemble import build_decoder
from captioner.training.batches import draws, shuffled_batches
from captioner.training.loop import person_free_repeats, train
from captioner.training.recipe import TrainConfig
from captioner.training.self_critical import (CiderD, ObjectReward, advantages, balanced_order, keeps_caption_quality,
                                              policy_loss, sequence_logprobs)

from conftest import SCENES
from test_training import tiny_config, tiny_dataset  # noqa: F401 (a fixture)

REFERENCES = [
    ["a dog runs on the grass", "a brown dog is running through a field", "the dog plays outside"],
    ["a man rides a bike down the street", "a cyclist on a road", "a man on a bicycle"],
    ["two children play in the water", "kids splash in a pool", "two kids swimming"],
    ["a woman in a red shirt sits on a bench", "a lady sitting on a park bench", "a woman rests on a bench"],
] + [[caption, caption.replace("a ", "the ", 1)] for _, caption, _ in SCENES]
CANDIDATES = ["a dog runs through the grass", "a man rides a bike", "children in the water",
              "a woman in a red", "a dog", "a woman sitting on a bench", "a bench", "the man on a road"]


def test_cider_d_equals_the_coco_evaluation_with_the_same_document_frequencies():
    references = [[tokenize(r) for r in refs] for refs in REFERENCES]
    candidates = [tokenize(CANDIDATES[i % len(CANDIDATES)]) for i in range(len(references))]
    ours = [CiderD(references).score(i, c) for i, c in enumerate(candidates)]
    mean, per_image = Cider().compute_score({i: [" ".join(r) for r in refs] for i, refs in enumerate(references)},
                                            {i: [" ".join(c)] for i, c in enumerate(candidates)})
    assert ours == pytest.approx(list(per_image), abs=1e-12)
    assert max(ours) > 0.5 and min(ours) == 0.0  # the fixture has real matches and a miss


def test_counting_end_widens_the_gap_between_a_finished_caption_and_the_same_caption_cut_mid_phrase():
    with_end = CiderD([[tokenize(r) + [END] for r in refs] for refs in REFERENCES])
    without = CiderD([[tokenize(r) for r in refs] for refs in REFERENCES])
    finished, cut = tokenize("a woman sits on a bench"), tokenize("a woman sits on a")
    gap_with_end = with_end.score(3, finished + [END]) - with_end.score(3, cut + [END])
    gap_without = without.score(3, finished) - without.score(3, cut)
    assert gap_with_end > 1.5 * gap_without > 0  # 2.21 against 1.33


def test_advantage_is_each_reward_minus_the_mean_of_the_other_samples():
    rewards = torch.tensor([[1.0, 2.0, 6.0], [0.5, 0.5, 0.5]])
    expected = torch.tensor([[1.0 - 4.0, 2.0 - 3.5, 6.0 - 1.5], [0.0, 0.0, 0.0]])
    assert torch.allclose(advantages(rewards), expected)


def test_a_policy_gradient_step_makes_the_better_sample_likelier_and_the_worse_one_rarer():
    torch.manual_seed(0)
    decoder = build_decoder(DecoderConfig(feature_dim=8, vocab_size=12, embed_dim=8, hidden_dim=16, dropout=0.0))
    features = torch.randn(1, 8).repeat(2, 1)
    tokens = torch.tensor([[START, 5, 6, 7, END], [START, 8, 9, END, 0]])
    lengths = torch.tensor([5, 4])
    before = sequence_logprobs(decoder, features, tokens, lengths).sum(1)
    optimizer = torch.optim.SGD(decoder.parameters(), lr=0.5)
    policy_loss(decoder, features, tokens, lengths, advantages(torch.tensor([[1.0, 0.0]])).view(-1)).backward()
    optimizer.step()
    after = sequence_logprobs(decoder, features, tokens, lengths).sum(1)
    assert after[0] > before[0] and after[1] < before[1]


def test_object_reward_pays_for_objects_most_references_name_and_charges_for_each_absent_one(tmp_path):
    (tmp_path / "objects.txt").write_text("person, man, woman, lady, people\ndog, puppy\nbench\nelephant\n")
    reward = ObjectReward(ObjectTable.load(tmp_path / "objects.txt"), REFERENCES[:4])
    # image 0: a dog in all three references; image 3: a woman and a bench in all three
    assert reward.score(0, "a dog runs on the grass") == 1
    assert reward.score(0, "a man and his dog on a bench") == 1 - 2
    assert reward.score(0, "two puppies and a dog") == 1  # one object, however often it is named
    assert reward.score(3, "a woman sitting on a bench") == 2
    assert reward.score(3, "a woman sitting") == 1
    assert reward.score(2, "an elephant and an elephant") == -2  # each absent mention costs
    assert reward.score(2, "children in the water") == 0  # "children" is not in this table


def test_caption_quality_guard_refuses_a_narrower_vocabulary_or_more_cut_captions():
    reference = {"distinct_words": 400, "distinct_captions": 850, "cut_mid_phrase": 5, "hit_max_length": 0}
    assert keeps_caption_quality(dict(reference, distinct_words=380), reference)
    assert not keeps_caption_quality(dict(reference, distinct_words=300), reference)
    assert not keeps_caption_quality(dict(reference, distinct_captions=600), reference)
    assert not keeps_caption_quality(dict(reference, cut_mid_phrase=9), reference)
    assert not keeps_caption_quality(dict(reference, hit_max_length=1), reference)


def test_a_balanced_epoch_draws_each_dataset_equally_often():
    groups = torch.tensor([0] * 30 + [1] * 7 + [2] * 11)  # 48 images: 16 draws from each dataset
    order = balanced_order(groups, torch.Generator().manual_seed(3))
    assert len(order) == 48 and torch.bincount(groups[order]).tolist() == [16, 16, 16]
    large = order[groups[order] == 0]
    assert len(set(large.tolist())) == 16  # a part of the large dataset, none twice
    small = torch.bincount(order[groups[order] == 1], minlength=37)[30:]
    assert small.min() >= 2 and small.max() <= 3  # every small-dataset image twice, two a third time
    assert not torch.equal(order, balanced_order(groups, torch.Generator().manual_seed(4)))


def test_photos_without_people_are_drawn_as_often_as_their_weight_says(tiny_dataset, tmp_path):
    # this table's "person" is a circle or a square: the stripes and the triangle show no one
    (tmp_path / "objects.txt").write_text("person, circle, square\ntriangle\n")
    table = ObjectTable.load(tmp_path / "objects.txt")
    records = load_dataset(tiny_dataset).split("train")
    name = records[0].dataset
    repeats = person_free_repeats({name: 3}, records, table)
    free = [not ("circle" in r.captions[0] or "square" in r.captions[0]) for r in records]
    assert repeats.tolist() == [3 if f else 1 for f in free] and sum(free) == 2
    assert person_free_repeats({}, records, None).tolist() == [1] * len(records)
    with pytest.raises(ValueError, match="person_free_weight: no training photos from a dataset named 'coco'"):
        person_free_repeats({"coco": 3}, records, table)
    with pytest.raises(ValueError, match=r"person_free_weight\[.*\] must be a whole number >= 1, not 1.5"):
        person_free_repeats({name: 1.5}, records, table)
    # an epoch of teacher forcing draws each caption of a person-free photo three times, in some order
    pool = draws(repeats)
    drawn = torch.cat([picked for picked, _ in shuffled_batches(pool, 2, 1, torch.Generator().manual_seed(0))])
    assert torch.bincount(drawn).tolist() == repeats.tolist()
    # the last phase's balanced draw: within a dataset, an image weighted 5 comes up about 5 times as often
    groups = torch.tensor([0] * 100 + [1] * 100)
    weights = torch.tensor([5] * 10 + [1] * 190)
    counts = torch.bincount(balanced_order(groups, torch.Generator().manual_seed(0), weights), minlength=200).float()
    assert len(counts) == 200 and counts[:10].mean() > 3 * counts[10:100].mean()
    assert counts[100:].tolist() == [1.0] * 100  # the other dataset as before: each image once


def test_training_draws_the_weighted_photos_in_both_phases(tiny_dataset, tmp_path):
    (tmp_path / "objects.txt").write_text("person, circle, square\ntriangle\n")
    name = tiny_dataset.parent.name  # a recipe's one dataset is named by its folder
    settings = dict(epochs=1, self_critical_epochs=1, self_critical_lr=1e-3, self_critical_samples=2, batch_size=4,
                    objects=str(tmp_path / "objects.txt"))
    train(tiny_config(tiny_dataset, tmp_path / "weighted", person_free_weight={name: 3}, **settings))
    train(tiny_config(tiny_dataset, tmp_path / "plain", **settings))
    steps = {run: [json.loads(line) for line in (tmp_path / run / "run" / "metrics.jsonl").read_text().splitlines()]
             for run in ("weighted", "plain")}
    # 4 captions, 2 of them drawn 3 times: 8 a teacher-forced epoch, two batches of 4 instead of one
    assert steps["weighted"][0]["step"] == 2 and steps["plain"][0]["step"] == 1
    assert steps["weighted"][1]["phase"] == "self-critical"
    with pytest.raises(ValueError, match="person_free_weight needs objects"):
        train(tiny_config(tiny_dataset, tmp_path / "no_table", person_free_weight={name: 3}))


def test_self_critical_phase_runs_after_the_decoder_and_keeps_a_loadable_best(tiny_dataset, tmp_path, capfd):
    best = train(tiny_config(tiny_dataset, tmp_path, epochs=2, self_critical_epochs=2, self_critical_lr=1e-3,
                             self_critical_samples=2, batch_size=4))
    out = capfd.readouterr()
    assert "self-critical epoch 3:" in out.out and "self-critical 2/2" in out.err
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("phase", "decoder") for r in rows] == ["decoder", "decoder", "self-critical", "self-critical"]
    assert all(0.0 <= r["train_reward"] <= 10.0 for r in rows[2:])
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0
    captioner = Captioner.from_pretrained(best, device="cpu")
    assert isinstance(captioner.caption(tiny_dataset.parent / "red_circle.jpg"), str)


def test_self_critical_phase_with_the_object_reward_logs_the_objects_its_samples_name(tiny_dataset, tmp_path):
    (tmp_path / "objects.txt").write_text("circle\nsquare\ntriangle\nstripe\n")
    train(tiny_config(tiny_dataset, tmp_path, epochs=2, self_critical_epochs=1, self_critical_lr=1e-3,
                      self_critical_samples=2, batch_size=4, self_critical_object_weight=0.5,
                      objects=str(tmp_path / "objects.txt")))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "train_objects" not in rows[0]
    # every sample names at most one shape its image has and loses 1 per other shape it names
    assert -20 <= rows[-1]["train_objects"] <= 1
    # the phase's checkpoint says which settings made it
    saved = json.loads((tmp_path / "run" / "self-critical" / "config.json").read_text())
    assert saved["training"]["recipe"]["self_critical_object_weight"] == 0.5


def test_the_object_reward_needs_a_readable_object_table_before_anything_trains(tmp_path):
    with pytest.raises(ValueError, match="self_critical_object_weight needs objects"):
        train(TrainConfig(output=str(tmp_path / "run"), self_critical_epochs=1, self_critical_object_weight=1.0))
    with pytest.raises(ValueError, match="missing.txt: cannot read the object table"):
        train(TrainConfig(output=str(tmp_path / "run"), self_critical_epochs=1, self_critical_object_weight=1.0,
                          objects=str(tmp_path / "missing.txt")))
    assert not (tmp_path / "run").exists()


def test_self_critical_refuses_to_follow_fine_tuning(tmp_path):
    with pytest.raises(ValueError, match="self_critical_epochs needs finetune_blocks = 0"):
        train(TrainConfig(output=str(tmp_path / "run"), self_critical_epochs=1, finetune_blocks=2))

"""The embedded world: determinism, ground truth the pixels agree with, teacher vs public fidelity."""

import re
from collections import Counter

import numpy as np
import pytest

from prism.config import ConfigError, FieldError, load_config
from prism.data.world import FAMILIES, PALETTE, WorldConfig, family_of, make_sample
from prism.response_format import count_caption_bullets, count_reasoning_steps, is_format_valid
from prism.rewards import answers_match, compute_reward


def test_samples_are_pure_functions_of_seed_split_and_index():
    cfg = WorldConfig()
    first, again = make_sample(cfg, "sft", 17), make_sample(cfg, "sft", 17)
    assert first.image_png() == again.image_png()
    assert first.teacher == again.teacher and first.public == again.public and first.question == again.question
    other_seed = make_sample(WorldConfig(seed=1), "sft", 17)
    assert (other_seed.image_png(), other_seed.question) != (first.image_png(), first.question)


def test_growing_one_split_leaves_the_others_unchanged():
    small, large = WorldConfig(sft_size=10), WorldConfig(sft_size=10_000)
    for index in range(5):
        a, b = make_sample(small, "rl", index), make_sample(large, "rl", index)
        assert a.image_png() == b.image_png() and a.answer == b.answer


def test_every_family_appears_and_training_splits_cycle_them_in_pairs():
    cfg = WorldConfig()
    families = [family_of(cfg, "sft", i) for i in range(2 * len(FAMILIES))]
    assert families[0::2] == list(FAMILIES) and families[0::2] == families[1::2]
    bench = [family_of(cfg, "bench", i) for i in range(cfg.split_size("bench"))]
    assert {f: bench.count(f) for f in FAMILIES} == {f: cfg.bench_size for f in FAMILIES}


def test_sft_family_repeats_repeat_a_family_in_the_sft_cycle_alone_and_keep_presence_pairs():
    even, repeated = WorldConfig(), WorldConfig(sft_family_repeats={"presence": 4})
    counts = Counter(family_of(repeated, "sft", i) for i in range(1800))
    assert counts["presence"] == 4 * counts["counting"] == 800 and len(counts) == len(FAMILIES)
    for split in ("base", "teacher", "rl", "bench"):  # the other splits: the same families at the same indices
        size = repeated.split_size(split)
        assert [family_of(repeated, split, i) for i in range(size)] == [family_of(even, split, i) for i in range(size)]
    presence = [i for i in range(40) if family_of(repeated, "sft", i) == "presence"]
    pairs = [make_sample(repeated, "sft", i) for i in presence]
    assert [s.answer for s in pairs] == ["yes", "no"] * (len(pairs) // 2)  # yes/no pairs on one scene each
    assert all(a.pair_id == b.pair_id and a.image_png() == b.image_png() for a, b in zip(pairs[0::2], pairs[1::2]))


@pytest.mark.parametrize(
    ("repeats", "field"),
    [({"presense": 2}, "sft_family_repeats.presense"), ({"presence": 0}, "sft_family_repeats.presence")],
)
def test_sft_family_repeats_name_a_family_and_a_count_of_at_least_one(repeats, field):
    with pytest.raises(FieldError, match=re.escape(f"field '{field}'")):
        WorldConfig(sft_family_repeats=repeats)


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_demonstrations_are_format_valid_and_earn_full_reward(family):
    cfg = WorldConfig(families=[family])
    for index in range(40):
        sample = make_sample(cfg, "teacher", index)
        assert sample.family == family
        assert is_format_valid(sample.teacher.text)
        result = compute_reward(sample.teacher.text, sample.answer, choices=sample.choices)
        assert result.score == pytest.approx(1.0), (sample.question, sample.teacher.text)


def test_colour_counts_agree_with_the_rendered_pixels():
    cfg = WorldConfig(families=["counting"])
    checked = 0
    for index in range(60):
        sample = make_sample(cfg, "bench", index)
        match = re.match(r"How many (\w+) shapes are there\?", sample.question)
        if not match:
            continue
        pixels = np.asarray(sample.image)
        centres = [pixels[r * 32 + 16, c * 32 + 18] for r in range(cfg.grid) for c in range(cfg.grid)]
        counted = sum(tuple(int(v) for v in centre) == PALETTE[match.group(1)] for centre in centres)
        assert str(counted) == sample.answer, sample.id
        checked += 1
    assert checked >= 15


def test_presence_questions_come_in_yes_no_pairs_on_one_image():
    cfg = WorldConfig(families=["presence"])
    for pair in range(10):
        yes, no = make_sample(cfg, "bench", 2 * pair), make_sample(cfg, "bench", 2 * pair + 1)
        assert yes.pair_id == no.pair_id is not None
        assert yes.image_png() == no.image_png()
        assert (yes.answer, no.answer) == ("yes", "no")


def test_presence_traps_ask_about_a_present_colour_and_a_present_shape():
    cfg = WorldConfig(families=["presence"])
    for pair in range(20):
        no = make_sample(cfg, "bench", 2 * pair + 1)
        colour, shape = re.match(r"Is there a (\w+) (\w+)", no.question).groups()
        caption = " ".join(no.teacher.caption_bullets)
        assert colour in caption and shape in caption and f"{colour} {shape}" not in caption


def test_presence_chain_counts_the_asked_shape_in_its_list_and_concludes_from_the_count():
    cfg = WorldConfig(families=["presence"])
    for index in range(40):
        sample = make_sample(cfg, "bench", index)
        colour, shape = re.match(r"Is there an? (\w+) (\w+)", sample.question).groups()
        listed, count, conclusion = sample.teacher.steps
        assert listed.startswith(f"{colour.capitalize()} shapes: ")
        written = int(re.fullmatch(rf"{colour.capitalize()} {shape}e?s: (\d+)\.", count).group(1))
        assert written == listed.split(": ", 1)[1].count(shape)
        assert conclusion == f"So a {colour} {shape} is {'present' if written else 'absent'}."
        assert sample.answer == ("yes" if written else "no")


def test_presence_steps_matches_copies_the_listed_items_of_the_asked_shape_and_changes_nothing_else():
    """presence_steps=matches: the middle line copies the list's items of the asked shape ("none" where it holds none)
    in both demonstrations; every other line and draw of every sample is the counted chain's."""
    counted, copied = WorldConfig(), WorldConfig(presence_steps="matches")
    seen = Counter()
    for index in range(120):
        a, b = make_sample(counted, "sft", index), make_sample(copied, "sft", index)
        assert (a.image_png(), a.question, a.answer, a.base_response) == (b.image_png(), b.question, b.answer,
                                                                          b.base_response)
        assert (a.teacher.caption_bullets, a.public.caption_bullets, a.public.answer) == \
            (b.teacher.caption_bullets, b.public.caption_bullets, b.public.answer)
        if a.family != "presence":
            assert (a.teacher, a.public) == (b.teacher, b.public)
            continue
        colour, shape = re.match(r"Is there an? (\w+) (\w+)", b.question).groups()
        listed, matches, conclusion = b.teacher.steps
        assert (listed, conclusion) == (a.teacher.steps[0], a.teacher.steps[2])
        items = listed.split(": ", 1)[1].rstrip(".").split(", ")
        expected = [item for item in items if item.split(" at ")[0] == shape] or ["none"]
        assert matches == f"{colour.capitalize()} {shape}s: {', '.join(expected)}."
        assert b.answer == ("no" if expected == ["none"] else "yes")
        seen[b.answer] += 1
        assert b.public.steps in ((f"The answer is {b.public.answer}.",), b.teacher.steps)
    assert seen["yes"] >= 5 and seen["no"] >= 5


def test_presence_steps_names_its_choices():
    with pytest.raises(FieldError, match=re.escape("field 'presence_steps'")):
        WorldConfig(presence_steps="filter")


def test_base_lookup_rate_lists_one_attribute_then_copies_the_items_of_both_and_changes_only_base_pairs():
    """base_lookup_rate: a share of the base pairs on grid scenes list the objects of one colour (or shape), then those
    of that colour and shape ("none" where the scene has none), read from the teacher's bullets (every object); chart
    and geometry scenes never; the question, demonstrations and image of every sample are the default's."""
    default, lookups = WorldConfig(), WorldConfig(base_lookup_rate=0.5)
    seen, directions = Counter(), Counter()
    for index in range(240):
        a, b = make_sample(default, "base", index), make_sample(lookups, "base", index)
        assert (a.image_png(), a.question, a.teacher, a.public) == (b.image_png(), b.question, b.teacher, b.public)
        if not b.base_prompt.startswith("List the "):
            continue
        assert b.family not in ("chart", "geometry")
        objects = [(*thing.split(" "), where) for thing, where in (bullet.split(" at ", 1)
                                                                    for bullet in b.teacher.caption_bullets)]
        prompt = re.fullmatch(r"List the (\w+)(?: shapes)?, then the (\w+) (\w+)s\.", b.base_prompt)
        first, colour, shape = prompt.groups()
        listed, looked_up = b.base_response.split(". ", 1)
        if first == colour:
            directions["colour"] += 1
            expected_list = [f"{s} at {where}" for c, s, where in objects if c == colour]
            assert listed == f"{colour.capitalize()} shapes: {', '.join(expected_list)}"
        else:
            directions["shape"] += 1
            assert first == shape + "s"
            expected_list = [f"{c} {s} at {where}" for c, s, where in objects if s == shape]
            assert listed == f"{shape.capitalize()}s: {', '.join(expected_list)}"
        both = [f"{s} at {where}" for c, s, where in objects if (c, s) == (colour, shape)] or ["none"]
        assert looked_up == f"{colour.capitalize()} {shape}s: {', '.join(both)}."
        seen["none" if both == ["none"] else "found"] += 1
    assert seen["none"] >= 5 and seen["found"] >= 5 and directions["colour"] >= 5 and directions["shape"] >= 5
    assert 50 <= seen.total() <= 110  # half of the grid scenes' pairs, 4 of 6 families: about 80 of 240
    assert [make_sample(WorldConfig(base_lookup_rate=0.0), "base", i).base_response for i in range(40)] == \
        [make_sample(default, "base", i).base_response for i in range(40)]


def test_base_lookup_rate_is_a_probability():
    with pytest.raises(FieldError, match=re.escape("field 'base_lookup_rate'")):
        WorldConfig(base_lookup_rate=1.5)


def test_public_demonstrations_are_lower_fidelity_than_the_teachers():
    cfg = WorldConfig(wrong_answer_rate=0.3, caption_drop_rate=0.3, skip_steps_rate=0.5)
    samples = [make_sample(cfg, "sft", i) for i in range(600)]
    wrong = np.mean([s.public.answer != s.answer for s in samples])
    assert 0.24 < wrong < 0.36
    teacher_bullets = np.mean([count_caption_bullets(s.teacher.text) for s in samples])
    public_bullets = np.mean([count_caption_bullets(s.public.text) for s in samples])
    teacher_steps = np.mean([count_reasoning_steps(s.teacher.text) for s in samples])
    public_steps = np.mean([count_reasoning_steps(s.public.text) for s in samples])
    assert public_bullets < 0.85 * teacher_bullets and public_steps < 0.8 * teacher_steps
    assert all(is_format_valid(s.public.text) for s in samples)


def test_skip_steps_by_family_changes_only_that_familys_public_steps():
    """presence at rate 0: every right presence demonstration writes the teacher's steps; every other draw of every
    sample (scene, caption, answer, base pair, other families) is the default's."""
    default, steps_kept = WorldConfig(), WorldConfig(skip_steps_by_family={"presence": 0.0})
    changed = 0
    for index in range(240):
        a, b = make_sample(default, "sft", index), make_sample(steps_kept, "sft", index)
        assert (a.image_png(), a.teacher, a.public.caption_bullets, a.public.answer) == \
            (b.image_png(), b.teacher, b.public.caption_bullets, b.public.answer)
        assert (a.base_prompt, a.base_response, a.base_system_prompt) == (b.base_prompt, b.base_response,
                                                                         b.base_system_prompt)
        if a.family != "presence":
            assert a.public == b.public
        elif b.public.answer == b.answer:  # a wrong answer still skips its steps
            assert b.public.steps == b.teacher.steps
            changed += a.public.steps != b.public.steps
    assert changed >= 5  # the default skipped some of these (skip_steps_rate 0.3)


@pytest.mark.parametrize(
    ("rates", "field"),
    [({"presense": 0.0}, "skip_steps_by_family.presense"), ({"presence": 1.5}, "skip_steps_by_family.presence")],
)
def test_skip_steps_by_family_names_a_family_and_a_probability(rates, field):
    with pytest.raises(FieldError, match=re.escape(f"field '{field}'")):
        WorldConfig(skip_steps_by_family=rates)


def test_public_equals_teacher_when_all_noise_is_off():
    cfg = WorldConfig(caption_drop_rate=0, terse_caption_rate=0, skip_steps_rate=0, wrong_answer_rate=0)
    for index in range(30):
        sample = make_sample(cfg, "sft", index)
        assert sample.public == sample.teacher


def test_base_corpus_is_untagged_with_or_without_the_system_prompt():
    samples = [make_sample(WorldConfig(), "base", index) for index in range(60)]
    assert all("<caption>" not in s.base_response and s.base_response.endswith(".") for s in samples)
    systems = [s.base_messages()[0]["role"] == "system" for s in samples]
    assert systems == [s.base_system_prompt for s in samples] and 0 < sum(systems) < len(samples)
    assert not any(make_sample(WorldConfig(base_system_prompt_rate=0), "base", i).base_system_prompt for i in range(20))


@pytest.mark.parametrize("rate", [0.0, 0.5, 1.0])
def test_base_corpus_answers_the_family_question_at_its_rate(rate):
    samples = [make_sample(WorldConfig(base_answer_rate=rate), "base", index) for index in range(120)]
    answered = [s for s in samples if s.base_prompt == s.question]
    assert all(answers_match(s.base_response, s.answer, choices=s.choices) for s in answered)
    assert {s.family for s in answered} == (set() if rate == 0 else set(FAMILIES))
    assert len(answered) / len(samples) == pytest.approx(rate, abs=0.12)
    # the answer draw comes last: the scene, question and demonstrations do not depend on the rate
    other = make_sample(WorldConfig(base_answer_rate=1 - rate), "base", 7)
    assert (other.question, other.teacher, other.public) == (samples[7].question, samples[7].teacher, samples[7].public)


@pytest.mark.parametrize("shuffle", [False, True])
def test_multichoice_answers_are_letters_among_the_options_in_order_unless_shuffled(shuffle):
    cfg = WorldConfig(families=["multichoice"], shuffle_options=shuffle)
    orders = set()
    for index in range(30):
        sample = make_sample(cfg, "rl", index)
        assert sample.answer in sample.choices and f"({sample.answer})" in sample.question
        assert sample.choices[sample.answer] in sample.teacher.steps[0]  # the letter names what the scene shows
        orders.add(tuple(sample.choices.values()))
    fixed = {("circle", "square", "triangle", "no shape"), ("red", "blue", "green", "yellow")}
    assert len(orders) > 2 if shuffle else orders == fixed  # fixed: one order per kind of question


def test_larger_grid_and_all_shapes_still_generate_valid_samples():
    cfg = WorldConfig(image_size=128, num_colours=6, num_shapes=4, max_objects=10)
    for index in range(24):
        sample = make_sample(cfg, "sft", index)
        assert sample.image.size == (128, 128) and is_format_valid(sample.teacher.text)


@pytest.mark.parametrize(
    ("field", "value"),
    [("image_size", 100), ("num_colours", 9), ("max_objects", 10), ("wrong_answer_rate", 1.5),
     ("families", ["charts"]), ("bench_size", 7), ("sft_size", -1)],
)
def test_invalid_world_fields_are_named(field, value):
    with pytest.raises(FieldError) as error:
        WorldConfig(**{field: value})
    assert field in str(error.value)


def test_world_yaml_errors_name_file_line_and_field(tmp_path):
    path = tmp_path / "world.yaml"
    path.write_text("seed: 3\nimage_size: 96\nwrong_answer_rate: 2.0\n")
    with pytest.raises(ConfigError) as error:
        load_config(WorldConfig, path)
    message = str(error.value)
    assert "world.yaml:3" in message and "wrong_answer_rate" in message

"""The prompt stream: seeded epoch permutations, resumable from a cursor."""

from prism.rollout.prompts import take_prompts


def test_prompt_stream_crosses_epochs_and_resumes_from_a_cursor():
    first = take_prompts(0, 10, num_records=4, seed=1)
    assert sorted(first[:4]) == [0, 1, 2, 3] and sorted(first[4:8]) == [0, 1, 2, 3]
    assert take_prompts(3, 5, num_records=4, seed=1) == first[3:8]
    assert take_prompts(0, 20, num_records=20, seed=2) != take_prompts(0, 20, num_records=20, seed=1)

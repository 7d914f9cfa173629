"""Length rewards on hand-computed token counts (metadata["response_length"])."""

import pytest

from rlhf.errors import ConfigError, DataError
from rlhf.rewards.length import length_penalty, overlong_penalty


def rows(*lengths):
    n = len(lengths)
    return [""] * n, [""] * n, [{"response_length": length} for length in lengths]


def test_overlong_penalty_matches_dapo_eq13():
    # L_max 16, L_cache 4: free up to 12, then (12 - L) / 4 down to -1 at 16, and -1 beyond.
    # 13 -> -1/4, 15 -> -3/4, 16 -> -4/4.
    got = overlong_penalty(*rows(10, 12, 13, 15, 16, 17), max_response_length=16, buffer=4)
    assert got == [0.0, 0.0, -0.25, -0.75, -1.0, -1.0]


def test_length_penalty_is_linear_beyond_the_target():
    # target 4, max 16: span 12; 10 -> -6/12, 16 -> -12/12.
    assert length_penalty(*rows(2, 4, 10, 16), max_response_length=16, target_length=4) == [0.0, 0.0, -0.5, -1.0]


@pytest.mark.parametrize("buffer", [0, 17])
def test_overlong_buffer_out_of_range(buffer):
    with pytest.raises(ConfigError, match=r"buffer .* must be in \(0, max_response_length 16\]"):
        overlong_penalty(*rows(3), max_response_length=16, buffer=buffer)


def test_length_needs_the_pipeline_metadata():
    with pytest.raises(DataError, match=r"row 0 has no 'response_length'"):
        overlong_penalty([""], ["x"], [{}], max_response_length=16, buffer=4)

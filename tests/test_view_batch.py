"""Many views at once (`sample_view_columns`, used by every plan) equal `sample_view` of each, value
for value, for the paper's policy and others, rejections and all."""

import pytest

from g2l_cache.view_batch import sample_view_columns
from g2l_cache.views import ViewPolicy, sample_view, view_param_names


@pytest.mark.parametrize("policy", [ViewPolicy(), ViewPolicy(tile_size=128, crop_size=112),
                                    ViewPolicy(tile_size=300, crop_size=99, hflip_p=0.2, blur_p=0.7, hue=0.2),
                                    ViewPolicy(tile_size=224, crop_size=224)],
                         ids=["paper", "demo", "odd", "no crop"])
def test_batched_view_parameters_equal_the_reference(policy):
    keys = [(f"slide-{i % 5}_x{i * 224}_y{i * 448}", k) for i in range(1500) for k in range(4)]
    columns = sample_view_columns(7, keys, policy)
    assert list(columns) == view_param_names()
    for i, (tile_id, k) in enumerate(keys):
        expected = sample_view(7, tile_id, k, policy)
        got = {name: columns[name][i] for name in columns}
        assert got == expected.to_dict(), (tile_id, k)
        assert all(type(got[name]) is type(getattr(expected, name)) for name in got)


def test_batched_seeding_equals_numpys_seed_sequence_and_pcg64():
    import numpy as np

    from g2l_cache.pcg_batch import pcg64_raw, seed_sequence_states

    entropy = np.random.default_rng(3).integers(0, 2**32, size=(3000, 4), dtype=np.uint64).astype(np.uint32)
    entropy[:40, 3] = 0  # high zero words: SeedSequence of the shorter entropy is the same stream
    entropy[:15, 1:] = 0
    entropy[:3] = 0
    entropy[3:6] = 0xFFFFFFFF
    raw, states = pcg64_raw(entropy, 16), seed_sequence_states(entropy)
    for i, words in enumerate(entropy):
        kept = len(words)
        while kept > 1 and words[kept - 1] == 0:
            kept -= 1
        assert np.array_equal(states[i], np.random.SeedSequence(words[:kept]).generate_state(4, np.uint64)), i
        assert np.array_equal(raw[i], np.random.PCG64(np.random.SeedSequence(words[:kept])).random_raw(16)), i

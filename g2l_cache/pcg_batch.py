"""numpy's `PCG64(SeedSequence(entropy))` for many 128-bit entropies at once: their first raw words.

Seeding one PCG64 from a SeedSequence costs ~25 µs of Python and Cython calls, a second for the
38,000 views of one real-size slide and an hour of CPU for a 1,000-slide cohort's 8 M views. Both
algorithms are a handful of integer operations, done here on arrays: SeedSequence's hash mixing on
32-bit words (numpy/random/bit_generator.pyx, pool size 4) and PCG64's 128-bit LCG with the XSL-RR
output (numpy/random/src/pcg64), the 128-bit products on 32-bit limbs. Tests compare every word with
numpy's own generators.
"""

from __future__ import annotations

import numpy as np

POOL_SIZE = 4
_INIT_A, _MULT_A = 0x43B0D7E5, 0x931E8875
_INIT_B, _MULT_B = 0x8B51F9DD, 0x58F38DED
_MIX_MULT_L, _MIX_MULT_R = 0xCA01F9DD, 0x4973F715
_XSHIFT = 16
_PCG_MULT_HIGH, _PCG_MULT_LOW = 2549297995355413924, 4865540595714422341
_M32 = np.uint64(0xFFFFFFFF)
_U32 = 0xFFFFFFFF


def seed_sequence_states(entropy: np.ndarray) -> np.ndarray:
    """`SeedSequence(row).generate_state(4, np.uint64)` of each row of `entropy` (n × ≤4 uint32)."""
    entropy = np.asarray(entropy, dtype=np.uint32)
    n = entropy.shape[0]
    words = np.zeros((n, POOL_SIZE), dtype=np.uint32)
    words[:, :entropy.shape[1]] = entropy  # missing words hash as zeros, as SeedSequence pads them
    with np.errstate(over="ignore"):
        hash_const = np.uint32(_INIT_A)
        mult_a, xshift = np.uint32(_MULT_A), np.uint32(_XSHIFT)

        def hashmix(value: np.ndarray) -> np.ndarray:
            nonlocal hash_const
            value = value ^ hash_const
            hash_const = hash_const * mult_a
            value = value * hash_const
            return value ^ (value >> xshift)

        def mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            result = np.uint32(_MIX_MULT_L) * x - np.uint32(_MIX_MULT_R) * y
            return result ^ (result >> xshift)

        pool = [hashmix(words[:, i]) for i in range(POOL_SIZE)]
        for i_src in range(POOL_SIZE):
            for i_dst in range(POOL_SIZE):
                if i_src != i_dst:
                    pool[i_dst] = mix(pool[i_dst], hashmix(pool[i_src]))
        state = np.empty((n, 2 * POOL_SIZE), dtype=np.uint32)
        const, mult_b = np.uint32(_INIT_B), np.uint32(_MULT_B)
        for i_dst in range(2 * POOL_SIZE):
            value = pool[i_dst % POOL_SIZE] ^ const
            const = const * mult_b
            value = value * const
            state[:, i_dst] = value ^ (value >> xshift)
    return state.astype("<u4").view("<u8").astype(np.uint64)


def _mul_128(high: np.ndarray, low: np.ndarray, m_high: int, m_low: int) -> tuple[np.ndarray, np.ndarray]:
    # (high, low) * (m_high, m_low) mod 2^128; the low 64 x 64 product on 32-bit limbs
    a0, a1 = low & _M32, low >> np.uint64(32)
    b0, b1 = np.uint64(m_low & _U32), np.uint64(m_low >> 32)
    p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
    mid = (p00 >> np.uint64(32)) + (p01 & _M32) + (p10 & _M32)
    out_low = (p00 & _M32) | (mid << np.uint64(32))
    out_high = p11 + (p01 >> np.uint64(32)) + (p10 >> np.uint64(32)) + (mid >> np.uint64(32))
    out_high = out_high + high * np.uint64(m_low) + low * np.uint64(m_high)
    return out_high, out_low


def _step(high, low, inc_high, inc_low):
    high, low = _mul_128(high, low, _PCG_MULT_HIGH, _PCG_MULT_LOW)
    new_low = low + inc_low
    return high + inc_high + (new_low < low).astype(np.uint64), new_low


def pcg64_raw(entropy: np.ndarray, n_words: int) -> np.ndarray:
    """`PCG64(SeedSequence(row)).random_raw(n_words)` of each row of `entropy` (n × ≤4 uint32)."""
    seeds = seed_sequence_states(entropy)
    one, sixty_three = np.uint64(1), np.uint64(63)
    with np.errstate(over="ignore"):
        init_high, init_low = seeds[:, 0], seeds[:, 1]
        inc_high = (seeds[:, 2] << one) | (seeds[:, 3] >> sixty_three)
        inc_low = (seeds[:, 3] << one) | one
        zeros = np.zeros_like(init_high)
        high, low = _step(zeros, zeros, inc_high, inc_low)
        new_low = low + init_low
        high, low = high + init_high + (new_low < low).astype(np.uint64), new_low
        high, low = _step(high, low, inc_high, inc_low)
        out = np.empty((len(seeds), n_words), dtype=np.uint64)
        for w in range(n_words):
            high, low = _step(high, low, inc_high, inc_low)
            xored, rot = high ^ low, high >> np.uint64(58)
            out[:, w] = (xored >> rot) | (xored << ((np.uint64(64) - rot) & sixty_three))
    return out

// Philox4x32-10, the counter-based random number generator of Salmon, Moraes, Dror and Shaw,
// "Parallel random numbers: as easy as 1, 2, 3" (SC 2011), as Random123 and cuRAND define it.
//
// A pure function: 128 bits of counter and 64 bits of key in, 128 random bits out. Nothing is
// carried from one call to the next, so any thread can draw the numbers of any (key, counter)
// in any order, and the host and CUDA builds give the same bits: only 32x32 -> 64-bit integer
// products, xors and additions, no floating point.
#pragma once

#include "portable.h"

struct nl_uint32x4 {
    uint32_t word[4];
};

struct nl_uint32x2 {
    uint32_t word[2];
};

// The multipliers and the key increments ("Weyl" constants: the golden ratio and sqrt(3) - 1
// as 32-bit fractions) of the published generator.
constexpr uint32_t kPhiloxMultiplier0 = 0xD2511F53u;
constexpr uint32_t kPhiloxMultiplier1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyStep0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyStep1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

// One round: two 32x32 -> 64-bit products, their high halves xored into the other two words.
NL_HOST_DEVICE nl_uint32x4 nl_philox_round(nl_uint32x4 counter, nl_uint32x2 key) {
    const uint64_t product0 = static_cast<uint64_t>(kPhiloxMultiplier0) * counter.word[0];
    const uint64_t product1 = static_cast<uint64_t>(kPhiloxMultiplier1) * counter.word[2];
    nl_uint32x4 out;
    out.word[0] = static_cast<uint32_t>(product1 >> 32) ^ counter.word[1] ^ key.word[0];
    out.word[1] = static_cast<uint32_t>(product1);
    out.word[2] = static_cast<uint32_t>(product0 >> 32) ^ counter.word[3] ^ key.word[1];
    out.word[3] = static_cast<uint32_t>(product0);
    return out;
}

// Ten rounds, the key advanced by the Weyl constants between rounds (unsigned wrap-around).
NL_HOST_DEVICE nl_uint32x4 nl_philox4x32_10(nl_uint32x4 counter, nl_uint32x2 key) {
    for (int round = 0; round < kPhiloxRounds; ++round) {
        if (round > 0) {
            key.word[0] += kPhiloxKeyStep0;
            key.word[1] += kPhiloxKeyStep1;
        }
        counter = nl_philox_round(counter, key);
    }
    return counter;
}

// floor(word / 2^32 * range): a 32-bit random word as an integer in [0, range), exactly, for
// 1 <= range <= 2^32 - 1 (the bias is below range / 2^32).
NL_HOST_DEVICE uint32_t nl_random_below(uint32_t word, uint32_t range) {
    return static_cast<uint32_t>((static_cast<uint64_t>(word) * range) >> 32);
}

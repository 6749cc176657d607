#include "codec/rans.h"

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace kvcache::codec::rans {
namespace {

Histogram Count(const std::vector<uint8_t>& syms) {
  Histogram h{};
  for (uint8_t s : syms) ++h[s];
  return h;
}

uint32_t Sum(const Frequencies& f) {
  uint32_t s = 0;
  for (uint16_t v : f) s += v;
  return s;
}

// Geometric-ish symbols, like quantized residuals.
std::vector<uint8_t> Skewed(size_t n, uint32_t seed, int alphabet) {
  std::mt19937 rng(seed);
  std::geometric_distribution<int> geo(0.3);
  std::vector<uint8_t> out(n);
  for (auto& s : out)
    s = static_cast<uint8_t>(std::min(geo(rng), alphabet - 1));
  return out;
}

TEST(Log2Fixed8Test, MatchesLibm) {
  for (uint32_t x : {1u, 2u, 3u, 5u, 100u, 4095u, 4096u, 65537u, 0xFFFFFFFFu}) {
    const double want = 256.0 * std::log2(static_cast<double>(x));
    EXPECT_LE(Log2Fixed8(x), want + 1e-9) << x;
    EXPECT_GT(Log2Fixed8(x), want - 2.0) << x;
  }
}

TEST(NormalizeTest, SumsToScaleAndKeepsEverySymbol) {
  Histogram h{};
  EXPECT_EQ(Sum(Normalize(h)), 0u);
  // Many rare symbols next to one huge one force the overshoot path.
  for (int s = 0; s < 256; ++s) h[s] = 1;
  h[7] = 1000000;
  Frequencies f = Normalize(h);
  EXPECT_EQ(Sum(f), kProbScale);
  for (int s = 0; s < 256; ++s) EXPECT_GE(f[s], 1) << s;
  // Flooring path: proportions are kept to within one unit.
  Histogram g{};
  g[0] = 3;
  g[1] = 5;
  g[200] = 9;
  f = Normalize(g);
  EXPECT_EQ(Sum(f), kProbScale);
  EXPECT_NEAR(f[1], 5.0 * kProbScale / 17, 2);
  EXPECT_EQ(f[2], 0);
  // Deterministic: the same input gives the same table.
  EXPECT_EQ(Normalize(g), f);
}

TEST(TableTest, RoundTripsEveryKind) {
  struct Case {
    Histogram counts;
    uint32_t alphabet;
    TableKind kind;
  };
  const std::vector<Case> cases = [] {
    std::vector<Case> c(5, Case{{}, 256, TableKind::kEmpty});
    c[1].counts[42] = 10;
    c[1].kind = TableKind::kSingle;
    for (int s = 0; s < 16; ++s) c[2].counts[s] = 1000;
    c[2].alphabet = 16;
    c[2].kind = TableKind::kUniform;
    for (auto& v : c[3].counts) v = 1000;  // Bytes at even odds.
    c[3].kind = TableKind::kStored;
    c[4].counts = Count(Skewed(5000, 1, 16));
    c[4].kind = TableKind::kExplicit;
    return c;
  }();
  for (size_t i = 0; i < cases.size(); ++i) {
    std::string bytes;
    const Table written =
        WriteTable(cases[i].counts, cases[i].alphabet, &bytes);
    EXPECT_EQ(written.kind, cases[i].kind) << i;
    EXPECT_EQ(static_cast<TableKind>(bytes[0]), cases[i].kind);
    internal::ByteReader in(bytes);
    Table read;
    ASSERT_TRUE(ReadTable(&in, cases[i].alphabet, &read).ok()) << i;
    EXPECT_EQ(read.kind, written.kind);
    EXPECT_EQ(read.freqs, written.freqs);
    EXPECT_EQ(in.remaining(), 0u);
  }
}

TEST(TableTest, RejectsBadTables) {
  Table table;
  const Frequencies& f = table.freqs;
  auto read = [&](std::string bytes, uint32_t alphabet = 256) {
    internal::ByteReader in(bytes);
    return ReadTable(&in, alphabet, &table);
  };
  EXPECT_FALSE(read("").ok());
  EXPECT_FALSE(read("\x09").ok());         // unknown kind
  EXPECT_FALSE(read("\x01").ok());         // truncated single
  EXPECT_FALSE(read("\x01\x09", 8).ok());  // symbol beyond alphabet
  EXPECT_TRUE(read("\x04").ok());          // stored bytes
  EXPECT_TRUE(table.stored());
  EXPECT_FALSE(read("\x04", 16).ok());  // stored symbols must be bytes
  ASSERT_TRUE(read("\x02", 16).ok());   // uniform over the alphabet
  EXPECT_EQ(f[15], kProbScale / 16);
  EXPECT_EQ(f[16], 0);
  EXPECT_FALSE(read(std::string("\x03\x05\x04", 3)).ok());  // first > last
  // Two symbols with 2048 + 2047: one short of the scale.
  EXPECT_FALSE(read(std::string("\x03\x00\x01\x80\x10\xFF\x0F", 7)).ok());
  EXPECT_TRUE(read(std::string("\x03\x00\x01\x80\x10\x80\x10", 7)).ok());
  EXPECT_FALSE(read(std::string("\x03\x00\x01\x80\x10\x80\x10", 7), 1).ok());
  EXPECT_FALSE(read(std::string("\x03\x00\x01\x80\x10\x80", 6)).ok());
  EXPECT_FALSE(read(std::string("\x03\x00\x00\x81\x20", 5)).ok());  // > scale
}

TEST(RansTest, RoundTripsBlocksOfManyLengths) {
  for (size_t n : {1, 2, 31, 32, 33, 64, 1000, 1024, 1100, 4096, 6000, 9000,
                   16384, 16385, 40000}) {
    const std::vector<uint8_t> syms = Skewed(n, static_cast<uint32_t>(n), 40);
    const Frequencies f = Normalize(Count(syms));
    std::string block;
    Encoder(f).EncodeBlock(syms.data(), syms.size(), &block);
    std::vector<uint8_t> got(n);
    ASSERT_TRUE(Decoder(f).DecodeBlock(block, got.data(), n).ok()) << n;
    EXPECT_EQ(got, syms) << n;
  }
}

TEST(RansTest, DecodesBlocksTwoAtATime) {
  // Lane counts 16, 2, 32, 8, 1: pairs of unequal blocks and an odd one out,
  // each with its own table.
  const size_t lengths[] = {8192, 1100, 16384, 4096, 100};
  std::vector<std::vector<uint8_t>> syms;
  std::vector<Decoder> decoders;
  std::vector<std::string> blocks;
  for (size_t n : lengths) {
    syms.push_back(Skewed(n, static_cast<uint32_t>(n) + 7, 20 + n % 50));
    const Frequencies f = Normalize(Count(syms.back()));
    decoders.emplace_back(f);
    blocks.emplace_back();
    Encoder(f).EncodeBlock(syms.back().data(), n, &blocks.back());
  }
  std::vector<std::vector<uint8_t>> got(syms.size());
  std::vector<BlockJob> jobs;
  for (size_t i = 0; i < syms.size(); ++i) {
    got[i].assign(syms[i].size(), 0);
    jobs.push_back({&decoders[i], blocks[i], got[i].data(), got[i].size()});
  }
  ASSERT_TRUE(DecodeBlocks(jobs).ok());
  EXPECT_EQ(got, syms);
  // A damaged block fails the batch, whichever side of a pair it is on.
  for (size_t bad = 0; bad < jobs.size(); ++bad) {
    std::string damaged = blocks[bad].substr(0, blocks[bad].size() - 2);
    std::vector<BlockJob> with_bad = jobs;
    with_bad[bad].block = damaged;
    EXPECT_FALSE(DecodeBlocks(with_bad).ok()) << bad;
  }
}

TEST(RansTest, CompressesNearEntropy) {
  const std::vector<uint8_t> syms = Skewed(16384, 9, 64);
  const Histogram h = Count(syms);
  const Frequencies f = Normalize(h);
  double entropy_bits = 0;
  for (uint32_t c : h) {
    if (c) entropy_bits -= c * std::log2(static_cast<double>(c) / syms.size());
  }
  std::string block;
  Encoder(f).EncodeBlock(syms.data(), syms.size(), &block);
  EXPECT_LT(8.0 * block.size(), entropy_bits * 1.02 + 8 * 4 * kLanes);
}

TEST(RansTest, SingleSymbolAndUniformTables) {
  std::vector<uint8_t> same(777, 5);
  Frequencies single{};
  single[5] = kProbScale;
  std::string block;
  Encoder(single).EncodeBlock(same.data(), same.size(), &block);
  EXPECT_EQ(block.size(), 4u * LanesFor(same.size()));  // Only the states.
  std::vector<uint8_t> got(same.size());
  ASSERT_TRUE(Decoder(single).DecodeBlock(block, got.data(), got.size()).ok());
  EXPECT_EQ(got, same);

  std::vector<uint8_t> all(4096);
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<uint8_t>(i * 7);
  Frequencies uniform;
  uniform.fill(kProbScale / 256);
  block.clear();
  Encoder(uniform).EncodeBlock(all.data(), all.size(), &block);
  EXPECT_EQ(block.size(), 4u * LanesFor(all.size()) + all.size());
  got.assign(all.size(), 0);
  ASSERT_TRUE(Decoder(uniform).DecodeBlock(block, got.data(), got.size()).ok());
  EXPECT_EQ(got, all);
}

TEST(RansTest, CorruptBlocksFailCleanly) {
  // 5 lanes (one by one), 17 (two groups of eight and one more), 32.
  for (size_t n : {3000, 9000, 16384}) {
    const std::vector<uint8_t> syms = Skewed(n, 3, 30);
    const Frequencies f = Normalize(Count(syms));
    std::string block;
    Encoder(f).EncodeBlock(syms.data(), syms.size(), &block);
    const Decoder dec(f);
    std::vector<uint8_t> got(syms.size());
    // Every truncation fails: words run out or the final states differ.
    for (size_t len = 0; len < block.size(); len += 2) {
      EXPECT_FALSE(
          dec.DecodeBlock(block.substr(0, len), got.data(), got.size()).ok())
          << n << " " << len;
    }
    EXPECT_FALSE(dec.DecodeBlock(block + "xx", got.data(), got.size()).ok());
    EXPECT_FALSE(dec.DecodeBlock(block, got.data(), got.size() - 1).ok());
    int detected = 0;
    for (size_t pos = 0; pos < block.size(); pos += 13) {
      std::string bad = block;
      bad[pos] ^= 0x04;
      detected += !dec.DecodeBlock(bad, got.data(), got.size()).ok();
    }
    // The final-state check catches nearly all flips (the CRC catches the
    // rest).
    EXPECT_GT(detected, static_cast<int>(block.size() / 13 * 9 / 10)) << n;
  }
}

}  // namespace
}  // namespace kvcache::codec::rans

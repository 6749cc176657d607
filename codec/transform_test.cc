// The transform levels (format v3): model profiles, RoPE arithmetic, and
// chunks encoded with a profile calibrated on other text of the same model.
#include "codec/transform.h"

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "codec/calibrate.h"
#include "codec/codec.h"
#include "codec/format.h"
#include "codec/kv_dump.h"
#include "codec/levels.h"
#include "codec/profile.h"
#include "codec/quantize.h"
#include "codec/transform_math.h"
#include "gtest/gtest.h"

namespace kvcache::codec {
namespace {

constexpr Level kTransformLevels[] = {
    Level::kProfileFine, Level::kProfileBalanced, Level::kProfileSmall};

// stories260K is a llama2.c model: RoPE base 10000 on adjacent pairs.
constexpr double kStoriesRopeTheta = 10000;

std::vector<KvDump> LoadStories() {
  absl::StatusOr<std::string> dir = FindKvDataDir();
  EXPECT_TRUE(dir.ok()) << dir.status();
  std::vector<KvDump> dumps;
  for (const char* name : {"stories260K-s1-512", "stories260K-s2-512",
                           "stories260K-s3-512-t0.7"}) {
    absl::StatusOr<KvDump> dump =
        LoadKvDump(absl::StrCat(*dir, "/", name, ".json"));
    EXPECT_TRUE(dump.ok()) << dump.status();
    if (dump.ok()) dumps.push_back(*std::move(dump));
  }
  return dumps;
}

// A profile of the second and third dumps; the first is the test text.
ModelProfile StoriesProfile(const std::vector<KvDump>& dumps) {
  const ChunkShape& s = dumps[1].shape;
  ProfileCalibrator calibrator(
      s.layers, s.kv_heads, s.head_dim, RopeLayout::kAdjacentPairs,
      RopeInverseFrequencies(kStoriesRopeTheta, s.head_dim));
  for (size_t i = 1; i < dumps.size(); ++i) {
    EXPECT_TRUE(calibrator.Add(dumps[i].shape, dumps[i].kv, 0).ok());
  }
  absl::StatusOr<ModelProfile> profile = calibrator.Finish();
  EXPECT_TRUE(profile.ok()) << profile.status();
  return *std::move(profile);
}

double RelativeL2(const ChunkShape& s, absl::Span<const uint16_t> want,
                  absl::Span<const uint16_t> got, int kv,
                  uint32_t skip_tokens = 0) {
  const size_t row = size_t{s.kv_heads} * s.head_dim;
  const size_t plane = s.tokens * row;
  double err = 0, ref = 0;
  for (size_t p = kv; p < 2 * size_t{s.layers}; p += 2) {
    for (size_t i = p * plane + skip_tokens * row; i < (p + 1) * plane; ++i) {
      const double a = internal::ToFloat(want[i], s.dtype);
      const double b = internal::ToFloat(got[i], s.dtype);
      err += (a - b) * (a - b);
      ref += a * a;
    }
  }
  return std::sqrt(err / ref);
}

// Tokens [t0, t0 + n) of a dump as a chunk.
std::vector<uint16_t> Slice(const KvDump& d, uint32_t t0, uint32_t n,
                            ChunkShape* shape) {
  *shape = d.shape;
  shape->tokens = n;
  return SliceTokens(d, t0, t0 + n);
}

class TransformLevelTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dumps_ = new std::vector<KvDump>(LoadStories());
    profile_ = new ModelProfile(StoriesProfile(*dumps_));
  }
  static void TearDownTestSuite() {
    delete dumps_;
    delete profile_;
  }
  // Tokens [t0, t0 + n) of dump `which` as a chunk at position `position`,
  // encoded at `level` with the suite's profile.
  static std::string EncodeAt(size_t which, uint32_t t0, uint32_t n,
                              uint32_t position, Level level,
                              std::vector<uint16_t>* values,
                              ChunkShape* shape) {
    *values = Slice((*dumps_)[which], t0, n, shape);
    EncodeOptions options;
    options.profile = profile_;
    options.first_position = position;
    absl::StatusOr<std::string> enc =
        EncodeChunk(*shape, *values, level, options);
    EXPECT_TRUE(enc.ok()) << enc.status();
    return enc.ok() ? *enc : std::string();
  }

  static std::vector<KvDump>* dumps_;
  static ModelProfile* profile_;
};
std::vector<KvDump>* TransformLevelTest::dumps_ = nullptr;
ModelProfile* TransformLevelTest::profile_ = nullptr;

TEST(RopeMathTest, SinCosWithinAFloatUlpOfTheLibrary) {
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<double> small(-10, 10), large(0, 1e6);
  for (int i = 0; i < 200000; ++i) {
    const double a = i % 2 ? small(rng) : large(rng);
    const internal::SinCos sc = internal::RopeSinCos(a);
    const float s = static_cast<float>(std::sin(a));
    const float c = static_cast<float>(std::cos(a));
    EXPECT_LE(std::fabs(sc.sin - s),
              std::nextafter(std::fabs(s), 2.0f) - std::fabs(s) + 1e-30f)
        << a;
    EXPECT_LE(std::fabs(sc.cos - c),
              std::nextafter(std::fabs(c), 2.0f) - std::fabs(c) + 1e-30f)
        << a;
  }
}

TEST(RopeMathTest, UndoThenApplyGivesThePairBack) {
  std::mt19937 rng(3);
  std::normal_distribution<float> n(0, 4);
  for (uint32_t pos : {0u, 1u, 777u, 131071u}) {
    const internal::SinCos t = internal::RopeAngle(pos, 0.3);
    const float a0 = n(rng), b0 = n(rng);
    float a = a0, b = b0;
    internal::RopeUndo(t, &a, &b);
    internal::RopeApply(t, &a, &b);
    EXPECT_NEAR(a, a0, 1e-5f * (std::fabs(a0) + std::fabs(b0)));
    EXPECT_NEAR(b, b0, 1e-5f * (std::fabs(a0) + std::fabs(b0)));
  }
}

TEST_F(TransformLevelTest, CalibratedBasesAreOrthonormalAndOrdered) {
  const ModelProfile& p = *profile_;
  EXPECT_EQ(p.layers, 5u);
  EXPECT_EQ(p.Heads(), size_t{p.layers} * 2 * p.kv_heads);
  for (size_t h = 0; h < p.Heads(); ++h) {
    for (uint32_t k = 1; k < p.head_dim; ++k) {
      EXPECT_LE(p.variance[h * p.head_dim + k],
                p.variance[h * p.head_dim + k - 1]);
    }
  }
  // FinishProfile checked orthonormality; a broken basis is refused.
  ModelProfile broken = p;
  broken.basis[3] += 0.01f;
  EXPECT_FALSE(FinishProfile(&broken).ok());
}

TEST_F(TransformLevelTest, ProfileBytesRoundTripAndNameTheirContent) {
  const std::string bytes = SerializeProfile(*profile_);
  absl::StatusOr<ModelProfile> parsed = ParseProfile(bytes);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->id, profile_->id);
  EXPECT_EQ(parsed->basis, profile_->basis);
  EXPECT_EQ(parsed->rope_inv_freq, profile_->rope_inv_freq);
  EXPECT_EQ(ProfileIdHex(parsed->id).size(), 32u);
  // Another calibration text gives another profile and id.
  ProfileCalibrator other(5, 4, 8, RopeLayout::kAdjacentPairs,
                          RopeInverseFrequencies(kStoriesRopeTheta, 8));
  ASSERT_TRUE(other.Add((*dumps_)[0].shape, (*dumps_)[0].kv, 0).ok());
  absl::StatusOr<ModelProfile> o = other.Finish();
  ASSERT_TRUE(o.ok());
  EXPECT_NE(o->id, profile_->id);
  // Damage is refused, never misread.
  EXPECT_TRUE(absl::IsDataLoss(ParseProfile(bytes.substr(0, 100)).status()));
  EXPECT_TRUE(
      absl::IsDataLoss(ParseProfile(bytes + std::string(4, '\0')).status()));
  std::string bad = bytes;
  bad[0] = 'X';
  EXPECT_TRUE(absl::IsDataLoss(ParseProfile(bad).status()));
  bad = bytes;
  bad[12] = 9;  // kv_heads: sizes no longer add up
  EXPECT_TRUE(absl::IsDataLoss(ParseProfile(bad).status()));
  bad = bytes;
  bad[bytes.size() - 4 * profile_->variance.size() - 9] ^= 0x40;  // a basis
  EXPECT_FALSE(ParseProfile(bad).ok());
}

// The profile with every head's sensitivity and every component's weight 1,
// except `head`'s sensitivity.
ModelProfile WithSensitivities(const ModelProfile& base, size_t head,
                               float sensitivity) {
  ModelProfile p = base;
  p.sensitivity.assign(p.Heads(), 1.0f);
  p.sensitivity[head] = sensitivity;
  p.component_weight.assign(p.Heads() * p.head_dim, 1.0f);
  EXPECT_TRUE(FinishProfile(&p).ok());
  return p;
}

TEST_F(TransformLevelTest, SensitivitiesTravelWithTheProfile) {
  ModelProfile p = WithSensitivities(*profile_, 9, 100);
  p.component_weight[9 * p.head_dim + 2] = 4;
  ASSERT_TRUE(FinishProfile(&p).ok());
  EXPECT_NE(p.id, profile_->id);
  const std::string bytes = SerializeProfile(p);
  EXPECT_EQ(bytes[4], 2);  // version 2: sensitivities and weights appended
  EXPECT_EQ(SerializeProfile(*profile_)[4], 1);
  absl::StatusOr<ModelProfile> parsed = ParseProfile(bytes);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->sensitivity, p.sensitivity);
  EXPECT_EQ(parsed->component_weight, p.component_weight);
  EXPECT_EQ(parsed->id, p.id);
  EXPECT_TRUE(absl::IsDataLoss(
      ParseProfile(bytes.substr(0, bytes.size() - 4)).status()));
  for (float bad : {0.0f, -1.0f, std::nanf("")}) {
    ModelProfile q = p;
    q.sensitivity[5] = bad;
    EXPECT_FALSE(FinishProfile(&q).ok()) << bad;
    q = p;
    q.component_weight[7] = bad;
    EXPECT_FALSE(FinishProfile(&q).ok()) << bad;
  }
  // Both or neither.
  ModelProfile lopsided = p;
  lopsided.sensitivity.pop_back();
  EXPECT_FALSE(FinishProfile(&lopsided).ok());
  lopsided = p;
  lopsided.component_weight.clear();
  EXPECT_FALSE(FinishProfile(&lopsided).ok());
  lopsided = p;
  lopsided.sensitivity.clear();
  EXPECT_FALSE(FinishProfile(&lopsided).ok());
}

TEST_F(TransformLevelTest, SensitivitiesGiveEveryComponentAnEqualSlope) {
  ModelProfile p = WithSensitivities(*profile_, 9, 100);
  p.component_weight[9 * p.head_dim + 2] = 4;
  ASSERT_TRUE(FinishProfile(&p).ok());
  const uint32_t d = p.head_dim;
  for (Level level : kTransformLevels) {
    const std::vector<internal::PlanePolicy> policies =
        internal::PlanePoliciesFor(level, p.layers, &p);
    ASSERT_EQ(policies.size(), size_t{p.layers} * 2);
    // Equal slopes: sensitivity * weight * step^2 is the same for every
    // component of every head.
    const float step = policies[0].channel_steps[0];
    const double share = 1.0 * step * step;
    for (size_t plane = 0; plane < policies.size(); ++plane) {
      EXPECT_EQ(policies[plane].mode, internal::ScaleMode::kPerChannel);
      ASSERT_EQ(policies[plane].channel_steps.size(), p.kv_heads * d);
      for (uint32_t c = 0; c < p.kv_heads * d; ++c) {
        const size_t head = plane * p.kv_heads + c / d;
        const float step = policies[plane].channel_steps[c];
        EXPECT_NEAR(p.sensitivity[head] * p.component_weight[head * d + c % d] *
                        step * step,
                    share, 1e-6 * share);
      }
    }
    // Head 9's steps: 10 times finer, and half that again for component 2.
    EXPECT_NEAR(policies[2].channel_steps[d + 0], step / 10, 1e-6 * step);
    EXPECT_NEAR(policies[2].channel_steps[d + 2], step / 20, 1e-6 * step);
    // Without sensitivities: one relative step per plane, as before.
    for (const internal::PlanePolicy& policy :
         internal::PlanePoliciesFor(level, p.layers, profile_)) {
      EXPECT_TRUE(policy.channel_steps.empty());
      EXPECT_GT(policy.relative_step, 0);
    }
  }
}

TEST_F(TransformLevelTest, ASensitiveHeadGetsTheFinerStep) {
  // Head 9 (layer 1's keys, KV head 1 of 4) 100 times as sensitive as the
  // others: its step is 10 times finer, so its squared error about 100
  // times smaller, while a head of sensitivity 1 keeps its error.
  ChunkShape s;
  const std::vector<uint16_t> in = Slice((*dumps_)[0], 256, 256, &s);
  const size_t dim = s.head_dim;
  auto head_mse = [&](const ModelProfile& p, size_t head) {
    EncodeOptions options;
    options.profile = &p;
    options.first_position = 256;
    absl::StatusOr<std::string> enc =
        EncodeChunk(s, in, Level::kProfileBalanced, options);
    EXPECT_TRUE(enc.ok()) << enc.status();
    std::vector<uint16_t> out(in.size());
    EXPECT_TRUE(DecodeChunk(*enc, absl::MakeSpan(out), &p).ok());
    const size_t row = size_t{s.kv_heads} * dim;
    const size_t plane = head / s.kv_heads;
    double sum = 0;
    for (size_t t = 0; t < s.tokens; ++t) {
      const size_t at =
          (plane * s.tokens + t) * row + (head % s.kv_heads) * dim;
      for (size_t i = at; i < at + dim; ++i) {
        const double e = internal::ToFloat(in[i], s.dtype) -
                         internal::ToFloat(out[i], s.dtype);
        sum += e * e;
      }
    }
    return sum / (s.tokens * dim);
  };
  const ModelProfile flat = WithSensitivities(*profile_, 9, 1);
  const ModelProfile sharp = WithSensitivities(*profile_, 9, 100);
  const float step =
      internal::PlanePoliciesFor(Level::kProfileBalanced, flat.layers, &flat)[2]
          .channel_steps[dim];
  // At most the uniform quantizer's step^2 / 12 (dropped components add
  // less than that), plus fp16 rounding.
  EXPECT_LT(head_mse(flat, 9), 1.1 * step * step / 12);
  EXPECT_GT(head_mse(flat, 9) / head_mse(sharp, 9), 30);
  // Head 8 shares its plane; head 17 is in another. Head 9's finer step
  // widens the integers of its whole plane, whose larger fp16 offsets round
  // a little further from the sets' centres: up to 10% more error there.
  EXPECT_NEAR(head_mse(sharp, 8), head_mse(flat, 8), 0.1 * head_mse(flat, 8));
  EXPECT_NEAR(head_mse(sharp, 17), head_mse(flat, 17),
              0.01 * head_mse(flat, 17));
}

TEST_F(TransformLevelTest, CalibrationNeedsItsShapeAndEnoughTokens) {
  ProfileCalibrator c(5, 4, 8, RopeLayout::kNone, {});
  EXPECT_TRUE(absl::IsFailedPrecondition(c.Finish().status()));
  ChunkShape wrong = (*dumps_)[0].shape;
  wrong.layers = 4;
  EXPECT_TRUE(absl::IsInvalidArgument(
      c.Add(wrong,
            absl::MakeConstSpan((*dumps_)[0].kv).first(wrong.NumValues()), 0)));
}

TEST_F(TransformLevelTest, LevelsKeepTheirErrorAndSizeOrder) {
  const KvDump& d = (*dumps_)[0];
  ChunkShape s;
  const std::vector<uint16_t> in = Slice(d, 256, 256, &s);
  absl::StatusOr<std::string> near = EncodeChunk(s, in, Level::kNearLossless);
  ASSERT_TRUE(near.ok());
  size_t last_bytes = near->size();
  double last_error = 0;
  for (Level level : kTransformLevels) {
    std::vector<uint16_t> values;
    const std::string stream = EncodeAt(0, 256, 256, 256, level, &values, &s);
    const std::string* enc = &stream;
    absl::StatusOr<StreamSummary> summary = PeekSummary(*enc);
    ASSERT_TRUE(summary.ok());
    EXPECT_EQ(summary->level, level);
    ASSERT_TRUE(summary->profile_id.has_value());
    EXPECT_EQ(*summary->profile_id, profile_->id);
    EXPECT_EQ(summary->first_position, 256u);
    EXPECT_EQ(static_cast<uint8_t>((*enc)[4]), internal::kTransformVersion);
    std::vector<uint16_t> out(in.size());
    ASSERT_TRUE(DecodeChunk(*enc, absl::MakeSpan(out), profile_).ok());
    const double k = RelativeL2(s, in, out, 0), v = RelativeL2(s, in, out, 1);
    // Each level stays within its relative error target, step / sqrt(12)
    // (levels.cc: at most 1.4 / sqrt(12) = 0.40), with room for the
    // components it drops.
    EXPECT_LT(k, 0.45) << LevelName(level);
    EXPECT_LT(v, 0.45) << LevelName(level);
    EXPECT_GT(k + v, last_error) << LevelName(level);
    EXPECT_LT(enc->size(), last_bytes) << LevelName(level);
    last_error = k + v;
    last_bytes = enc->size();
  }
}

TEST_F(TransformLevelTest, KeysComeBackAtTheirPositions) {
  // The same values stored as if at position 0 and at 200000: each decodes
  // near its input only with RoPE re-applied at the position it recorded.
  ChunkShape s;
  std::vector<uint16_t> in;
  for (uint32_t position : {128u, 200000u}) {
    const std::string enc =
        EncodeAt(0, 128, 128, position, Level::kProfileFine, &in, &s);
    std::vector<uint16_t> out(in.size());
    ASSERT_TRUE(DecodeChunk(enc, absl::MakeSpan(out), profile_).ok());
    EXPECT_LT(RelativeL2(s, in, out, 0), 0.1) << position;
  }
}

TEST_F(TransformLevelTest, FirstPositionsAreStoredExactly) {
  ChunkShape s;
  std::vector<uint16_t> in;
  for (uint32_t position : {0u, 2u, 64u}) {
    const std::string stream =
        EncodeAt(0, 0, 64, position, Level::kProfileSmall, &in, &s);
    const std::string* enc = &stream;
    std::vector<uint16_t> out(in.size());
    ASSERT_TRUE(DecodeChunk(*enc, absl::MakeSpan(out), profile_).ok());
    const uint32_t exact = internal::ExactTokens(position, s.tokens);
    EXPECT_EQ(exact, position < internal::kExactPositions
                         ? internal::kExactPositions - position
                         : 0u);
    const size_t row = size_t{s.kv_heads} * s.head_dim;
    size_t differing = 0;
    for (size_t p = 0; p < 2 * size_t{s.layers}; ++p) {
      for (size_t i = 0; i < exact * row; ++i) {
        differing += in[p * s.tokens * row + i] != out[p * s.tokens * row + i];
      }
    }
    EXPECT_EQ(differing, 0u) << position;
    // The rest is lossy.
    EXPECT_GT(RelativeL2(s, in, out, 1, exact), 0.0) << position;
  }
}

// The decoder's result is defined bit for bit (FORMAT.md, "Transform"): the
// integers through the stored scales, each head summed component by
// component with fused multiply-adds, RoPE, rounding. Recomputed here from
// the stream's sections with the shared scalar arithmetic.
TEST_F(TransformLevelTest, DecodeFollowsTheFormatsArithmeticBitForBit) {
  ChunkShape s;
  std::vector<uint16_t> in;
  const std::string stream =
      EncodeAt(2, 100, 50, 100, Level::kProfileBalanced, &in, &s);
  const std::string* enc = &stream;
  std::vector<uint16_t> out(in.size());
  ASSERT_TRUE(DecodeChunk(*enc, absl::MakeSpan(out), profile_).ok());

  // Recompute the coefficients from the input with ForwardComponent, the
  // integers with the stored maps, then the values.
  absl::StatusOr<internal::Sections> sections = internal::ParseSections(*enc);
  ASSERT_TRUE(sections.ok());
  const internal::Header& h = sections->header;
  const ModelProfile& p = *profile_;
  const uint32_t dim = p.head_dim, row = h.Channels();
  const std::vector<internal::SinCos> rope =
      internal::RopeTable(p, 100, s.tokens);
  absl::string_view scales = sections->scales;
  size_t mismatches = 0;
  for (uint32_t plane = 0; plane < h.Planes(); ++plane) {
    const bool is_value = plane % 2 == 1;
    const auto* sc = reinterpret_cast<const uint8_t*>(scales.data());
    const uint8_t bits = sections->planes[plane].bits;
    for (uint32_t t = 0; t < s.tokens; ++t) {
      for (uint32_t head = 0; head < s.kv_heads; ++head) {
        const size_t index = p.Head(plane / 2, is_value, head);
        const float* basis = p.Basis(index);
        std::vector<float> x(dim), centered(dim), acc(dim);
        for (uint32_t i = 0; i < dim; ++i) {
          x[i] = internal::ToFloat(
              in[(size_t{plane} * s.tokens + t) * row + head * dim + i],
              s.dtype);
        }
        for (uint32_t j = 0; !is_value && j < dim / 2; ++j) {
          internal::RopeUndo(rope[t * dim / 2 + j], &x[2 * j], &x[2 * j + 1]);
        }
        for (uint32_t i = 0; i < dim; ++i) {
          centered[i] = x[i] - p.Mean(index)[i];
          acc[i] = p.Mean(index)[i];
        }
        for (uint32_t k = 0; k < dim; ++k) {
          const uint32_t c = head * dim + k;
          const internal::Affine a = {
              internal::ToFloat(internal::LoadU16(sc + 4 * c), s.dtype),
              internal::ToFloat(internal::LoadU16(sc + 4 * c + 2), s.dtype)};
          if (a.step == 0) continue;
          const float y =
              internal::ForwardComponent(basis + k * dim, centered.data(), dim);
          const uint16_t q = internal::Quantizer(a, bits)(y);
          const float coeff = a.offset + static_cast<float>(q) * a.step;
          for (uint32_t i = 0; i < dim; ++i) {
            acc[i] = internal::FmaRn(basis[k * dim + i], coeff, acc[i]);
          }
        }
        for (uint32_t j = 0; !is_value && j < dim / 2; ++j) {
          internal::RopeApply(rope[t * dim / 2 + j], &acc[2 * j],
                              &acc[2 * j + 1]);
        }
        for (uint32_t i = 0; i < dim; ++i) {
          mismatches +=
              internal::RoundCoefficientSum(acc[i], s.dtype) !=
              out[(size_t{plane} * s.tokens + t) * row + head * dim + i];
        }
      }
    }
    scales.remove_prefix(4 * row);
  }
  EXPECT_EQ(mismatches, 0u);
}

TEST_F(TransformLevelTest, DecodingNeedsTheProfileItNames) {
  const KvDump& d = (*dumps_)[0];
  ChunkShape s;
  std::vector<uint16_t> in;
  const std::string stream =
      EncodeAt(0, 0, 32, 0, Level::kProfileBalanced, &in, &s);
  const std::string* enc = &stream;
  EncodeOptions options;
  options.profile = profile_;
  std::vector<uint16_t> out(in.size());
  absl::Status none = DecodeChunk(*enc, absl::MakeSpan(out));
  EXPECT_TRUE(absl::IsFailedPrecondition(none)) << none;
  EXPECT_NE(none.message().find(ProfileIdHex(profile_->id)),
            absl::string_view::npos);
  ProfileCalibrator other(5, 4, 8, RopeLayout::kAdjacentPairs,
                          RopeInverseFrequencies(kStoriesRopeTheta, 8));
  ASSERT_TRUE(other.Add(d.shape, d.kv, 0).ok());
  const ModelProfile wrong = *other.Finish();
  EXPECT_TRUE(absl::IsFailedPrecondition(
      DecodeChunk(*enc, absl::MakeSpan(out), &wrong)));
  // Encoding at a transform level needs a profile of the chunk's shape.
  EXPECT_TRUE(absl::IsInvalidArgument(
      EncodeChunk(s, in, Level::kProfileBalanced).status()));
  ChunkShape fewer = s;
  fewer.layers = 4;
  EXPECT_TRUE(absl::IsInvalidArgument(
      EncodeChunk(fewer, absl::MakeConstSpan(in).first(fewer.NumValues()),
                  Level::kProfileBalanced, options)
          .status()));
  // Other levels ignore a profile and stay version 2.
  absl::StatusOr<std::string> plain = EncodeChunk(s, in, Level::kHigh, options);
  ASSERT_TRUE(plain.ok());
  EXPECT_EQ(static_cast<uint8_t>((*plain)[4]), internal::kPlainVersion);
  EXPECT_FALSE(PeekSummary(*plain)->profile_id.has_value());
  EXPECT_TRUE(DecodeChunk(*plain, absl::MakeSpan(out)).ok());
}

TEST_F(TransformLevelTest, DamagedTransformSectionsAreDataLoss) {
  ChunkShape s;
  std::vector<uint16_t> in;
  const std::string stream =
      EncodeAt(0, 0, 32, 0, Level::kProfileSmall, &in, &s);
  const std::string* enc = &stream;
  std::vector<uint16_t> out(in.size());
  const size_t section = internal::kFixedHeaderBytes + 2 * 2 * s.layers;
  // The id no longer matching the header's fingerprint.
  std::string bad = *enc;
  bad[section] ^= 1;
  EXPECT_TRUE(
      absl::IsDataLoss(DecodeChunk(bad, absl::MakeSpan(out), profile_)));
  // More exact tokens than the chunk has.
  bad = *enc;
  bad[section + 20] = 33;
  EXPECT_TRUE(absl::IsDataLoss(PeekSummary(bad).status()));
  // A version 2 header may not name a transform.
  bad = *enc;
  bad[4] = internal::kPlainVersion;
  EXPECT_FALSE(PeekSummary(bad).ok());
  // Every truncation.
  for (size_t n = 0; n < enc->size(); n += 7) {
    EXPECT_FALSE(
        DecodeChunk(enc->substr(0, n), absl::MakeSpan(out), profile_).ok())
        << n;
  }
}

}  // namespace
}  // namespace kvcache::codec

// Python's documentation as real text (see real_text.h).
#include "client/examples/chat/real_text.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <system_error>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace kvcache::chat {
namespace {

namespace fs = std::filesystem;

// Every *.rst.txt under root, relative to it, sorted.
absl::StatusOr<std::vector<std::string>> ListSources(const std::string& root) {
  std::error_code error;
  if (!fs::is_directory(root, error)) {
    return absl::NotFoundError(absl::StrCat(
        "no Python documentation at ", root,
        "; run deploy/setup.sh (it installs Debian's python3.11-doc)"));
  }
  std::vector<std::string> paths;
  for (fs::recursive_directory_iterator it(root, error), end;
       !error && it != end; it.increment(error)) {
    const std::string path = it->path().string();
    if (it->is_regular_file() && absl::EndsWith(path, ".rst.txt")) {
      paths.push_back(fs::relative(it->path(), root).string());
    }
  }
  if (error) {
    return absl::InternalError(
        absl::StrCat("cannot list ", root, ": ", error.message()));
  }
  std::sort(paths.begin(), paths.end());
  return paths;
}

absl::StatusOr<std::string> ReadText(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::ostringstream text;
  text << file.rdbuf();
  return text.str();
}

// A reStructuredText section title is underlined by a run of one
// punctuation character at least as long as the title.
bool IsUnderline(absl::string_view line, size_t title_length) {
  if (line.size() < 3 || line.size() < title_length) return false;
  const char c = line[0];
  if (c != '=' && c != '-' && c != '~' && c != '^' && c != '*') return false;
  return std::all_of(line.begin(), line.end(), [c](char x) { return x == c; });
}

}  // namespace

TextSet SetOf(absl::string_view relative_path, int library_position) {
  if (absl::StartsWith(relative_path, "howto/") ||
      absl::StartsWith(relative_path, "faq/")) {
    return TextSet::kEvaluation;
  }
  if (absl::StartsWith(relative_path, "library/")) {
    return library_position % 2 == 1 ? TextSet::kEvaluation
                                     : TextSet::kCalibration;
  }
  return TextSet::kCalibration;
}

absl::StatusOr<std::vector<Document>> LoadDocuments(const std::string& root,
                                                    TextSet set) {
  absl::StatusOr<std::vector<std::string>> paths = ListSources(root);
  if (!paths.ok()) return paths.status();
  std::vector<Document> documents;
  int library_position = 0;
  for (const std::string& path : *paths) {
    const bool library = absl::StartsWith(path, "library/");
    const TextSet path_set = SetOf(path, library_position);
    if (library) ++library_position;
    if (path_set != set) continue;
    absl::StatusOr<std::string> text = ReadText(absl::StrCat(root, "/", path));
    if (!text.ok()) return text.status();
    documents.push_back({path, *std::move(text)});
  }
  return documents;
}

absl::StatusOr<std::vector<std::string>> LoadFaqQuestions(
    const std::string& root) {
  absl::StatusOr<std::vector<std::string>> paths = ListSources(root);
  if (!paths.ok()) return paths.status();
  std::vector<std::string> questions;
  for (const std::string& path : *paths) {
    if (!absl::StartsWith(path, "faq/")) continue;
    absl::StatusOr<std::string> text = ReadText(absl::StrCat(root, "/", path));
    if (!text.ok()) return text.status();
    const std::vector<absl::string_view> lines = absl::StrSplit(*text, '\n');
    for (size_t i = 0; i + 1 < lines.size(); ++i) {
      if (absl::EndsWith(lines[i], "?") &&
          IsUnderline(lines[i + 1], lines[i].size())) {
        questions.emplace_back(lines[i]);
      }
    }
  }
  return questions;
}

}  // namespace kvcache::chat

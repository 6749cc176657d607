// Real text for the reference worker's measurements: the documentation of
// Python as Debian ships it (package python3.11-doc, the reStructuredText
// sources of docs.python.org), written by Python's authors, not by kvcache.
//
// It is split once and for all into two sets, so that codec settings chosen
// on one are judged on the other:
//  - evaluation: howto/, faq/ (whose questions make the chats' user turns),
//    and the files of library/ at odd positions in sorted order;
//  - calibration: everything else (tutorial/, reference/, c-api/, ..., and
//    the files of library/ at even positions).
//
// Thread-safe: functions keep no state.
#ifndef KVCACHE_CLIENT_EXAMPLES_CHAT_REAL_TEXT_H_
#define KVCACHE_CLIENT_EXAMPLES_CHAT_REAL_TEXT_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvcache::chat {

// Where python3.11-doc installs the sources.
inline constexpr char kPythonDocsRoot[] =
    "/usr/share/doc/python3.11/html/_sources";

enum class TextSet { kEvaluation, kCalibration };

// Which set a file belongs to, by its path relative to the root and its
// position among library/'s files in sorted order (unused elsewhere).
TextSet SetOf(absl::string_view relative_path, int library_position);

struct Document {
  std::string path;  // relative to the root
  std::string text;
};

// The set's documents (*.rst.txt, recursively), sorted by path. NOT_FOUND,
// saying to run deploy/setup.sh, if the root does not exist.
absl::StatusOr<std::vector<Document>> LoadDocuments(const std::string& root,
                                                    TextSet set);

// The questions of the FAQ (faq/*.rst.txt, evaluation set): section titles
// that end in '?', in file and then text order.
absl::StatusOr<std::vector<std::string>> LoadFaqQuestions(
    const std::string& root);

}  // namespace kvcache::chat

#endif  // KVCACHE_CLIENT_EXAMPLES_CHAT_REAL_TEXT_H_

// gRPC credentials for kvcache's links, built from PEM files: the node's
// server credentials, the credentials a node dials its peers with, and those
// of clients (workers, kvcachectl).
//
// Files are checked before gRPC sees them (each one parses, a key belongs to
// its certificate), so a mistake is reported naming the file and the option
// that named it instead of surfacing later as a failed handshake. Uses gRPC's
// TLS credentials and OpenSSL (both from Debian); thread-safe.
#ifndef KVCACHE_TRANSFER_TLS_CREDENTIALS_H_
#define KVCACHE_TRANSFER_TLS_CREDENTIALS_H_

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace kvcache::transfer {

// Paths of PEM files, and the names of the options that gave them (for error
// messages: "tls.cert_file", "--cert", ...). An empty path is not used.
struct TlsFiles {
  std::string ca_file;    // CA bundle the other side must chain to
  std::string cert_file;  // this side's certificate chain
  std::string key_file;   // its private key
  std::string ca_option = "ca_file";
  std::string cert_option = "cert_file";
  std::string key_option = "key_file";
};

// The contents of TlsFiles, checked.
struct TlsPem {
  std::string ca;
  std::string cert;
  std::string key;
};

// Reads a whole file. NOT_FOUND or PERMISSION_DENIED naming `option`, the
// path and the reason when it cannot; INVALID_ARGUMENT when it is empty.
absl::StatusOr<std::string> ReadCredentialFile(const std::string& path,
                                               absl::string_view option);

// Reads the files that are named and checks them: the CA bundle holds
// certificates, the certificate parses, the key parses and is the
// certificate's private key, and cert_file and key_file come together.
// Errors name the option and the file.
absl::StatusOr<TlsPem> LoadTlsFiles(const TlsFiles& files);

// OK if the first certificate in `cert_pem` is valid now; otherwise
// FAILED_PRECONDITION saying when it expired (or starts), naming `option`.
absl::Status CheckValidNow(const std::string& cert_pem,
                           absl::string_view option);

// What the node asks of the clients that connect to it.
enum class ClientCertificates {
  kNotRequested,         // no ca_file: one-way TLS
  kVerifiedIfPresented,  // a certificate a client presents must chain to
                         // the CA, and then identifies it
  kRequired,             // mutual TLS: no certificate, no connection
};

// Server credentials that read `files` (cert and key required; the CA when
// certificates are requested) every `reload_interval`: renewed files are
// used for handshakes from then on, while connections already made keep
// theirs. Checks the files once now (LoadTlsFiles).
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentials(
    const TlsFiles& files, ClientCertificates client_certificates,
    absl::Duration reload_interval);

// Channel credentials for a node dialling its peers: mutual TLS with the
// node's own certificate, the peer's certificate checked against the CA and
// the address dialled; reloaded like ServerCredentials. Needs all three
// files.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>>
ReloadingChannelCredentials(const TlsFiles& files,
                            absl::Duration reload_interval);

// Channel credentials for a client from files read once: TLS when a CA is
// named (with the client certificate if one is named), plaintext when no
// file is. A client certificate without a CA is INVALID_ARGUMENT, as is an
// expired client certificate (naming it).
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ClientCredentials(
    const TlsFiles& files);

// What to tell a user whose connection to `address` failed with TLS in use:
// "TLS handshake with ADDRESS failed" and which credential to check.
std::string HandshakeFailureHint(const TlsFiles& files,
                                 absl::string_view address);

}  // namespace kvcache::transfer

#endif  // KVCACHE_TRANSFER_TLS_CREDENTIALS_H_

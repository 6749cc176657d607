#include "transfer/tls_credentials.h"

#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_credentials_options.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"

namespace kvcache::transfer {
namespace {

struct BioFree {
  void operator()(BIO* bio) const { BIO_free(bio); }
};
struct X509Free {
  void operator()(X509* x509) const { X509_free(x509); }
};
struct KeyFree {
  void operator()(EVP_PKEY* key) const { EVP_PKEY_free(key); }
};
using Bio = std::unique_ptr<BIO, BioFree>;
using Certificate = std::unique_ptr<X509, X509Free>;
using PrivateKey = std::unique_ptr<EVP_PKEY, KeyFree>;

Bio MemoryBio(const std::string& pem) {
  return Bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
}

// OpenSSL keeps errors in a per-thread queue; a failed parse here must not
// leave entries that gRPC's next TLS call on this thread would misread.
std::string TakeOpenSslError() {
  const unsigned long code = ERR_peek_last_error();
  char text[256] = "no detail";
  if (code != 0) ERR_error_string_n(code, text, sizeof(text));
  ERR_clear_error();
  return text;
}

std::string Quoted(absl::string_view option, const std::string& path) {
  return absl::StrCat(option, " '", path, "'");
}

absl::StatusOr<std::vector<Certificate>> ParseCertificates(
    const std::string& pem, absl::string_view option, const std::string& path) {
  std::vector<Certificate> certificates;
  Bio bio = MemoryBio(pem);
  while (X509* x509 = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr)) {
    certificates.emplace_back(x509);
  }
  ERR_clear_error();  // the end of the input reads as an error
  if (certificates.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        Quoted(option, path), " holds no PEM certificate (BEGIN CERTIFICATE)"));
  }
  return certificates;
}

std::string AsText(const ASN1_TIME* time) {
  Bio bio(BIO_new(BIO_s_mem()));
  ASN1_TIME_print(bio.get(), time);
  char* data = nullptr;
  const long size = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, size);
}

}  // namespace

absl::StatusOr<std::string> ReadCredentialFile(const std::string& path,
                                               absl::string_view option) {
  std::ifstream file(path, std::ios::binary);
  if (!file) {
    const int error = errno;
    const std::string what = absl::StrCat("cannot read ", Quoted(option, path),
                                          ": ", std::strerror(error));
    return error == EACCES ? absl::PermissionDeniedError(what)
                           : absl::NotFoundError(what);
  }
  std::stringstream text;
  text << file.rdbuf();
  if (text.str().empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(Quoted(option, path), " is empty"));
  }
  return text.str();
}

absl::StatusOr<TlsPem> LoadTlsFiles(const TlsFiles& files) {
  if (files.cert_file.empty() != files.key_file.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        files.cert_option, " and ", files.key_option,
        " go together: a certificate is presented with its private key"));
  }
  TlsPem pem;
  if (!files.ca_file.empty()) {
    absl::StatusOr<std::string> ca =
        ReadCredentialFile(files.ca_file, files.ca_option);
    if (!ca.ok()) return ca.status();
    absl::StatusOr<std::vector<Certificate>> parsed =
        ParseCertificates(*ca, files.ca_option, files.ca_file);
    if (!parsed.ok()) return parsed.status();
    pem.ca = *std::move(ca);
  }
  if (files.cert_file.empty()) return pem;

  absl::StatusOr<std::string> cert =
      ReadCredentialFile(files.cert_file, files.cert_option);
  if (!cert.ok()) return cert.status();
  absl::StatusOr<std::vector<Certificate>> chain =
      ParseCertificates(*cert, files.cert_option, files.cert_file);
  if (!chain.ok()) return chain.status();
  absl::StatusOr<std::string> key =
      ReadCredentialFile(files.key_file, files.key_option);
  if (!key.ok()) return key.status();
  Bio bio = MemoryBio(*key);
  PrivateKey parsed_key(
      PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr));
  if (!parsed_key) {
    return absl::InvalidArgumentError(
        absl::StrCat(Quoted(files.key_option, files.key_file),
                     " holds no PEM private key: ", TakeOpenSslError()));
  }
  if (X509_check_private_key(chain->front().get(), parsed_key.get()) != 1) {
    TakeOpenSslError();
    return absl::InvalidArgumentError(absl::StrCat(
        Quoted(files.key_option, files.key_file), " is not the private key of ",
        Quoted(files.cert_option, files.cert_file)));
  }
  pem.cert = *std::move(cert);
  pem.key = *std::move(key);
  return pem;
}

absl::Status CheckValidNow(const std::string& cert_pem,
                           absl::string_view option) {
  Bio bio = MemoryBio(cert_pem);
  Certificate cert(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
  if (!cert) {
    return absl::InvalidArgumentError(absl::StrCat(
        option, " holds no PEM certificate: ", TakeOpenSslError()));
  }
  if (X509_cmp_current_time(X509_get0_notAfter(cert.get())) <= 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("the certificate in ", option, " expired on ",
                     AsText(X509_get0_notAfter(cert.get()))));
  }
  if (X509_cmp_current_time(X509_get0_notBefore(cert.get())) >= 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("the certificate in ", option, " is not valid before ",
                     AsText(X509_get0_notBefore(cert.get()))));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentials(
    const TlsFiles& files, ClientCertificates client_certificates,
    absl::Duration reload_interval) {
  if (files.cert_file.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "TLS needs ", files.cert_option, " and ", files.key_option));
  }
  if (client_certificates != ClientCertificates::kNotRequested &&
      files.ca_file.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("checking client certificates needs ", files.ca_option));
  }
  if (absl::StatusOr<TlsPem> pem = LoadTlsFiles(files); !pem.ok()) {
    return pem.status();
  }
  const bool with_ca = client_certificates != ClientCertificates::kNotRequested;
  // The provider reads the files on its own thread every interval and hands
  // changed contents to the handshakes that follow.
  auto provider =
      std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
          files.key_file, files.cert_file, with_ca ? files.ca_file : "",
          static_cast<unsigned>(
              std::max<int64_t>(1, absl::ToInt64Seconds(reload_interval))));
  grpc::experimental::TlsServerCredentialsOptions options(provider);
  options.watch_identity_key_cert_pairs();
  switch (client_certificates) {
    case ClientCertificates::kNotRequested:
      options.set_cert_request_type(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
      break;
    case ClientCertificates::kVerifiedIfPresented:
      options.watch_root_certs();
      options.set_cert_request_type(
          GRPC_SSL_REQUEST_CLIENT_CERTIFICATE_AND_VERIFY);
      break;
    case ClientCertificates::kRequired:
      options.watch_root_certs();
      options.set_cert_request_type(
          GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
      break;
  }
  return grpc::experimental::TlsServerCredentials(options);
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>>
ReloadingChannelCredentials(const TlsFiles& files,
                            absl::Duration reload_interval) {
  if (files.ca_file.empty() || files.cert_file.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("mutual TLS needs ", files.ca_option, ", ",
                     files.cert_option, " and ", files.key_option));
  }
  if (absl::StatusOr<TlsPem> pem = LoadTlsFiles(files); !pem.ok()) {
    return pem.status();
  }
  auto provider =
      std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
          files.key_file, files.cert_file, files.ca_file,
          static_cast<unsigned>(
              std::max<int64_t>(1, absl::ToInt64Seconds(reload_interval))));
  grpc::experimental::TlsChannelCredentialsOptions options;
  options.set_certificate_provider(provider);
  options.watch_identity_key_cert_pairs();
  options.watch_root_certs();
  // Server certificates are verified against the CA and, by gRPC's default
  // verifier, against the host dialled.
  options.set_verify_server_certs(true);
  return grpc::experimental::TlsCredentials(options);
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ClientCredentials(
    const TlsFiles& files) {
  if (files.ca_file.empty()) {
    if (!files.cert_file.empty() || !files.key_file.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "a client certificate (", files.cert_option, ", ", files.key_option,
          ") is only sent over TLS, which needs ", files.ca_option,
          " (the CA the node's certificate chains to)"));
    }
    return grpc::InsecureChannelCredentials();
  }
  absl::StatusOr<TlsPem> pem = LoadTlsFiles(files);
  if (!pem.ok()) return pem.status();
  if (!pem->cert.empty()) {
    if (absl::Status s = CheckValidNow(
            pem->cert, Quoted(files.cert_option, files.cert_file));
        !s.ok()) {
      return s;
    }
  }
  grpc::SslCredentialsOptions options;
  options.pem_root_certs = pem->ca;
  options.pem_cert_chain = pem->cert;
  options.pem_private_key = pem->key;
  return grpc::SslCredentials(options);
}

std::string HandshakeFailureHint(const TlsFiles& files,
                                 absl::string_view address) {
  std::string hint = absl::StrCat(
      "TLS handshake with ", address,
      " failed: check that the node's certificate chains to the CA in ",
      Quoted(files.ca_option, files.ca_file),
      ", names the host dialled and has not expired");
  if (files.cert_file.empty()) {
    absl::StrAppend(&hint, "; if the node requires client certificates ",
                    "(mutual TLS), give one with ", files.cert_option, " and ",
                    files.key_option);
  } else {
    absl::StrAppend(&hint, ", and that the client certificate in ",
                    Quoted(files.cert_option, files.cert_file),
                    " chains to a CA the node trusts");
  }
  return hint;
}

}  // namespace kvcache::transfer

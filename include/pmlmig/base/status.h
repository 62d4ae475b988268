// Errors as values. Every component boundary returns Status or Result<T>;
// nothing throws across one. errno becomes a Status in exactly one place
// (Status::FromErrno), so every system-call failure reads the same way:
//   "<what failed> (<on what>): <strerror>".
#pragma once

#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace pmlmig {

enum class Code : int {
  kOk = 0,
  kInvalidArgument,    // the caller's input is wrong (flags, sizes, messages)
  kNotFound,           // a file, device or object does not exist
  kPermissionDenied,   // EACCES / EPERM
  kUnavailable,        // a capability or device the host lacks
  kResourceExhausted,  // ENOMEM, limits
  kAborted,            // stopped on request (Ctrl-C, cancel)
  kDataLoss,           // a check found lost or corrupted data
  kInternal,           // anything else, including unexpected errno
};

std::string_view CodeName(Code code);

class [[nodiscard]] Status {
 public:
  Status() = default;  // OK
  Status(Code code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status Ok() { return Status(); }
  // Converts errno into a Status: "<what>: <strerror(err)>", with a code
  // derived from the errno value. The only place the project reads errno text.
  static Status FromErrno(int err, std::string_view what);

  bool ok() const { return code_ == Code::kOk; }
  Code code() const { return code_; }
  const std::string& message() const { return message_; }
  // "ok" or the message; for logs and the command line.
  std::string ToString() const { return ok() ? std::string("ok") : message_; }

  // Returns a copy whose message is prefixed by context: "<context>: <message>".
  Status WithContext(std::string_view context) const;

 private:
  Code code_ = Code::kOk;
  std::string message_;
};

inline Status InvalidArgument(std::string m) { return {Code::kInvalidArgument, std::move(m)}; }
inline Status Unavailable(std::string m) { return {Code::kUnavailable, std::move(m)}; }
inline Status Internal(std::string m) { return {Code::kInternal, std::move(m)}; }
inline Status DataLoss(std::string m) { return {Code::kDataLoss, std::move(m)}; }
inline Status ResourceExhausted(std::string m) { return {Code::kResourceExhausted, std::move(m)}; }
inline Status Aborted(std::string m) { return {Code::kAborted, std::move(m)}; }
inline Status PermissionDenied(std::string m) { return {Code::kPermissionDenied, std::move(m)}; }

// A value or the Status explaining why there is none.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}              // NOLINT: implicit by design
  Result(Status status) : v_(std::move(status)) {}       // NOLINT: must not be OK
  bool ok() const { return std::holds_alternative<T>(v_); }
  const Status& status() const {
    static const Status kOk;
    return ok() ? kOk : std::get<Status>(v_);
  }
  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace pmlmig

#define PMLMIG_CONCAT_INNER(a, b) a##b
#define PMLMIG_CONCAT(a, b) PMLMIG_CONCAT_INNER(a, b)

#define PMLMIG_RETURN_IF_ERROR(expr)               \
  do {                                             \
    ::pmlmig::Status pmlmig_status_ = (expr);      \
    if (!pmlmig_status_.ok()) return pmlmig_status_; \
  } while (0)

#define PMLMIG_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                                 \
  if (!tmp.ok()) return tmp.status();                \
  lhs = std::move(tmp).value()

#define PMLMIG_ASSIGN_OR_RETURN(lhs, expr) \
  PMLMIG_ASSIGN_OR_RETURN_IMPL(PMLMIG_CONCAT(pmlmig_result_, __LINE__), lhs, expr)

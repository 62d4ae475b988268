#include "pmlmig/base/units.h"

#include <cctype>
#include <cmath>
#include <cstdio>
#include <limits>

namespace pmlmig {
namespace {

std::string Lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

// Splits "123abc" into the leading number (digits and at most one '.') and the rest.
bool SplitNumber(std::string_view text, std::string_view* number, std::string_view* suffix) {
  size_t i = 0;
  bool dot = false;
  while (i < text.size() && (std::isdigit(static_cast<unsigned char>(text[i])) || (text[i] == '.' && !dot))) {
    dot |= text[i] == '.';
    ++i;
  }
  *number = text.substr(0, i);
  *suffix = text.substr(i);
  return !number->empty() && *number != ".";
}

}  // namespace

Result<uint64_t> ParseSize(std::string_view text) {
  std::string_view number, suffix;
  if (!SplitNumber(text, &number, &suffix) || number.find('.') != std::string_view::npos) {
    return InvalidArgument("invalid size '" + std::string(text) +
                           "': expected a whole number with an optional K, M, G or T suffix");
  }
  std::string s = Lower(suffix);
  if (s.size() >= 2 && s.substr(s.size() - 2) == "ib") s.resize(s.size() - 2);
  else if (!s.empty() && s.back() == 'b') s.pop_back();
  unsigned shift = 0;
  if (s.empty()) shift = 0;
  else if (s == "k") shift = 10;
  else if (s == "m") shift = 20;
  else if (s == "g") shift = 30;
  else if (s == "t") shift = 40;
  else {
    return InvalidArgument("invalid size '" + std::string(text) + "': unknown suffix '" +
                           std::string(suffix) + "' (use K, M, G or T)");
  }
  uint64_t value = 0;
  for (char c : number) {
    uint64_t digit = static_cast<uint64_t>(c - '0');
    if (value > (std::numeric_limits<uint64_t>::max() - digit) / 10) {
      return InvalidArgument("invalid size '" + std::string(text) + "': too large");
    }
    value = value * 10 + digit;
  }
  if (shift > 0 && value > (std::numeric_limits<uint64_t>::max() >> shift)) {
    return InvalidArgument("invalid size '" + std::string(text) + "': too large");
  }
  return value << shift;
}

Result<std::chrono::nanoseconds> ParseDuration(std::string_view text) {
  std::string_view number, suffix;
  if (!SplitNumber(text, &number, &suffix)) {
    return InvalidArgument("invalid duration '" + std::string(text) +
                           "': expected a number with an optional ms, s or m suffix");
  }
  double v = std::strtod(std::string(number).c_str(), nullptr);
  std::string s = Lower(suffix);
  double ns_per_unit;
  if (s.empty() || s == "s") ns_per_unit = 1e9;
  else if (s == "ms") ns_per_unit = 1e6;
  else if (s == "us") ns_per_unit = 1e3;
  else if (s == "m" || s == "min") ns_per_unit = 60e9;
  else if (s == "h") ns_per_unit = 3600e9;
  else {
    return InvalidArgument("invalid duration '" + std::string(text) + "': unknown unit '" +
                           std::string(suffix) + "' (use ms, s, m or h)");
  }
  double ns = v * ns_per_unit;
  if (!std::isfinite(ns) || ns > 1e18) {
    return InvalidArgument("invalid duration '" + std::string(text) + "': too long");
  }
  return std::chrono::nanoseconds(static_cast<int64_t>(ns));
}

std::string FormatBytes(uint64_t bytes) {
  static const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  int u = 0;
  double v = static_cast<double>(bytes);
  while (v >= 1024.0 && u < 5) {
    v /= 1024.0;
    ++u;
  }
  char buf[32];
  if (u == 0 || v == std::floor(v)) std::snprintf(buf, sizeof buf, "%.0f %s", v, kUnits[u]);
  else std::snprintf(buf, sizeof buf, "%.1f %s", v, kUnits[u]);
  return buf;
}

std::string FormatHex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

}  // namespace pmlmig

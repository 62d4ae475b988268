// Parsing and printing of the sizes, rates and durations that users type.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>

#include "pmlmig/base/status.h"

namespace pmlmig {

// "4096", "64K", "512M", "1G", "2T" (binary multiples, optional "iB"/"B"
// suffix, case-insensitive). Rejects empty input, negative values, fractions,
// unknown suffixes and overflow, naming the offending text.
Result<uint64_t> ParseSize(std::string_view text);

// "250ms", "5s", "2m", "1.5s"; a bare number means seconds.
Result<std::chrono::nanoseconds> ParseDuration(std::string_view text);

// 1536 -> "1.5 KiB"; exact multiples print without decimals ("64 GiB").
std::string FormatBytes(uint64_t bytes);

// "0x1f": lower-case hex with a 0x prefix (addresses, ids, digests in messages).
std::string FormatHex(uint64_t v);

}  // namespace pmlmig

#!/usr/bin/env bash
# The package, as an embedder meets it (issue 10). Run by ctest (package_test):
#   1. libpmlmig.so's dynamic symbol table holds pmlmig_* only, each in the
#      version node PMLMIG_<ABI> and each declared PMLMIG_API in pmlmig.h;
#      the functions in REQUIRED_SYMBOLS are there; SONAME libpmlmig.so.<ABI>.
#   2. include/pmlmig/pmlmig.h compiles on its own as C11 (-std=c11 -Wall
#      -Wextra -Werror -pedantic) and as C++20 (-Wall -Wextra -Werror).
#   3. a C program calling pmlmig_version() links against the built library
#      and runs.
#   4. (when the build has install rules) `cmake --install` to a temporary
#      prefix holds what it should, nothing in its CMake files or pmlmig.pc
#      points back into the build or source tree, and three consumers build
#      and run against it: find_package(pmlmig) + pmlmig::pmlmig (C, with TBB
#      and gRPC made unfindable: the shared library needs neither),
#      find_package(pmlmig COMPONENTS engine) + pmlmig::engine (C++, static,
#      gRPC and protobuf unfindable, compiled with a warning that pmlmig's
#      -Werror would turn into an error if it leaked), find_package(pmlmig
#      COMPONENTS transport) + pmlmig::transport (C++, static), and pkg-config.
#   5. a consumer project pulls the source tree in with add_subdirectory, as
#      PMLMIG_ENGINE_ONLY with gRPC, protobuf and CLI11 made unfindable, and
#      links pmlmig::engine: the alias targets exist, tools and tests stay out,
#      pmlmig's sources compile with -Werror and the consumer's without. It
#      compiles base and engine (about 20 s on 2 cores).
#
# Not run by ctest, because it compiles and runs everything an engine-only
# build has, tests included (about 3.5 minutes on 2 cores); run it by hand
# after a build-system change:
#   package_test.sh --engine-only [SRC]    configure and build SRC (default:
#       this checkout) with PMLMIG_ENGINE_ONLY=ON and gRPC, protobuf and CLI11
#       made unfindable, then run the tests it built
#   package_test.sh --subdirectory [SRC]   check 5 alone
# SRC should be a copy without build directories (or a clean clone).
#
# Environment (set by tests/CMakeLists.txt): LIBPMLMIG (the built .so),
# PMLMIG_SOURCE_DIR, PMLMIG_BUILD_DIR, CC, CXX, PMLMIG_TEST_FLAGS (sanitizer
# flags of an instrumented build, for what is compiled here), PMLMIG_INSTALL.
# PMLMIG_PACKAGE_KEEP=1 keeps the work directory (install tree, consumers).
set -euo pipefail

# The C ABI functions that must be exported. Add each one as the C ABI
# implementation lands (capi/); every exported symbol must be declared
# PMLMIG_API in pmlmig.h in any case. PMLMIG_PACKAGE_STRICT=1 (the default,
# now that the whole ABI is implemented) requires every declared function.
REQUIRED_SYMBOLS=(
  pmlmig_version
  pmlmig_version_string
  pmlmig_abi_version
  pmlmig_wire_version
  pmlmig_features
  pmlmig_last_error
  pmlmig_vm_create
  pmlmig_vm_mark_dirty
  pmlmig_vm_destroy
  pmlmig_source_create
  pmlmig_source_start
  pmlmig_source_wait
  pmlmig_source_cancel
  pmlmig_source_destroy
  pmlmig_receiver_start
  pmlmig_receiver_wait
  pmlmig_receiver_destroy
)

here=$(cd "$(dirname "$0")" && pwd)
src_default=$(cd "$here/../.." && pwd)
CC=${CC:-cc}
CXX=${CXX:-c++}
read -r -a test_flags <<<"${PMLMIG_TEST_FLAGS:-}"
work=$(mktemp -d "${TMPDIR:-/tmp}/pmlmig-package.XXXXXX")
if [ "${PMLMIG_PACKAGE_KEEP:-0}" = 1 ]; then
  echo "package_test: keeping $work"
else
  trap 'rm -rf "$work"' EXIT
fi
failures=0

fail() {
  echo "package_test: FAIL: $*" >&2
  failures=$((failures + 1))
}
pass() { echo "package_test: ok: $*"; }

# ---- slow, manual modes ------------------------------------------------------

# configure_quiet LOG ARGS...: cmake configure, its log shown only on failure.
configure_quiet() {
  local log=$1
  shift
  if ! cmake "$@" >"$log" 2>&1; then
    cat "$log" >&2
    return 1
  fi
}

unfindable=(-DCMAKE_DISABLE_FIND_PACKAGE_gRPC=ON -DCMAKE_DISABLE_FIND_PACKAGE_Protobuf=ON
            -DCMAKE_DISABLE_FIND_PACKAGE_CLI11=ON)

engine_only() {  # engine_only SRC
  local src=$1 b=$work/engine-only t0=$SECONDS
  configure_quiet "$work/eo-configure.log" -S "$src" -B "$b" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DPMLMIG_ENGINE_ONLY=ON -DPMLMIG_BUILD_BENCH=OFF "${unfindable[@]}" || { fail "engine-only configure"; return 1; }
  # (A REQUIRED find of a disabled package fails the configure outright.)
  if grep -E '^(gRPC_DIR|CLI11_DIR):PATH=/|^Protobuf_LIBRARY[A-Z_]*:FILEPATH=/' "$b/CMakeCache.txt"; then
    fail "the engine-only configure found gRPC, protobuf or CLI11"
  fi
  cmake --build "$b" -j "${JOBS:-2}" || { fail "engine-only build"; return 1; }
  for t in pmlmig_transport pmlmig_shared pmlmig; do
    if ninja -C "$b" -t targets all | grep -q "^$t:"; then fail "the engine-only build has target $t"; fi
  done
  (cd "$b" && ctest --output-on-failure -j "${JOBS:-2}") || { fail "engine-only tests"; return 1; }
  pass "engine-only build of $src and its tests ($((SECONDS - t0)) s)"
}

subdirectory() {  # subdirectory SRC
  local src=$1 c=$work/subdir t0=$SECONDS
  mkdir -p "$c"
  cat >"$c/CMakeLists.txt" <<EOF
cmake_minimum_required(VERSION 3.25)
project(pmlmig_subdir_consumer C CXX)
set(PMLMIG_ENGINE_ONLY ON)
add_subdirectory("$src" pmlmig)
foreach(t pmlmig::base pmlmig::engine)
  if(NOT TARGET \${t})
    message(FATAL_ERROR "add_subdirectory(pmlmig) defines no \${t}")
  endif()
endforeach()
foreach(t pmlmig_transport pmlmig_shared pmlmig engine_test pmlmig_bench_micro)
  if(TARGET \${t})
    message(FATAL_ERROR "add_subdirectory(pmlmig) defines \${t}: engine only, no tools, tests or benchmarks by default")
  endif()
endforeach()
add_executable(consumer main.cc)
target_link_libraries(consumer PRIVATE pmlmig::engine)
EOF
  engine_consumer_source >"$c/main.cc"
  configure_quiet "$work/subdir-configure.log" -S "$c" -B "$c/b" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_C_COMPILER="$CC" -DCMAKE_CXX_COMPILER="$CXX" "${unfindable[@]}" ||
    { fail "the add_subdirectory consumer's configure"; return 1; }
  ninja -C "$c/b" -t commands consumer >"$work/subdir-commands.txt"
  if grep -F 'main.cc' "$work/subdir-commands.txt" | grep -q -e '-Werror' -e '-Wall'; then
    fail "pmlmig's warning flags reach the add_subdirectory consumer's own sources"
  fi
  grep -F 'engine/slot_table.cc' "$work/subdir-commands.txt" | grep -q -e '-Werror' ||
    fail "pmlmig's own sources compile without -Werror under add_subdirectory"
  cmake --build "$c/b" -j "${JOBS:-2}" --target consumer >"$work/subdir-build.log" 2>&1 ||
    { cat "$work/subdir-build.log" >&2; fail "the add_subdirectory consumer's build"; return 1; }
  local out
  out=$("$c/b/consumer") || { fail "the add_subdirectory consumer's run"; return 1; }
  pass "add_subdirectory (engine only, gRPC/protobuf/CLI11 unfindable) + pmlmig::engine: $out ($((SECONDS - t0)) s)"
}

# A C++ consumer of the static engine. The unused variable is a warning under
# pmlmig's flags (-Wall ... -Werror): if they leaked, it would not compile.
engine_consumer_source() {
  cat <<'EOF'
#include <cstdio>
#include <cstdlib>
#include <span>

#include "pmlmig/engine/dirty_set.h"
#include "pmlmig/engine/slot_table.h"

int main() {
  int unused_on_purpose = 0;
  alignas(4096) static uint8_t memory[4 * 4096];
  pmlmig::engine::SlotTable slots;
  pmlmig::engine::MemorySlot slot;
  slot.slot = 1;
  slot.gpa = 0x100000;
  slot.host = memory;
  slot.size = sizeof(memory);
  if (!slots.Set(slot).ok()) return 1;
  pmlmig::engine::DirtySet dirty(slots);
  dirty.MarkSlotPage(1, 2);
  dirty.MarkSlotPage(1, 3);
  if (dirty.Count() != 2) return 1;
  std::printf("engine consumer: %llu dirty pages\n", static_cast<unsigned long long>(dirty.Count()));
  return EXIT_SUCCESS;
}
EOF
}

case "${1:-}" in
  --engine-only) engine_only "$(cd "${2:-$src_default}" && pwd)" || true; exit $((failures > 0)) ;;
  --subdirectory) subdirectory "$(cd "${2:-$src_default}" && pwd)" || true; exit $((failures > 0)) ;;
  "") ;;
  *) echo "usage: $0 [--engine-only [SRC] | --subdirectory [SRC]]" >&2; exit 2 ;;
esac

# ---- the checks ctest runs ---------------------------------------------------

: "${LIBPMLMIG:?set LIBPMLMIG to the built libpmlmig.so (tests/CMakeLists.txt does)}"
: "${PMLMIG_SOURCE_DIR:=$src_default}"
header=$PMLMIG_SOURCE_DIR/include/pmlmig/pmlmig.h
abi=$(sed -n 's/^#define PMLMIG_ABI_VERSION \([0-9]*\).*/\1/p' "$header")
version=$(sed -n 's/^#define PMLMIG_VERSION_\(MAJOR\|MINOR\|PATCH\) \([0-9]*\).*/\2/p' "$header" | paste -sd.)
node=PMLMIG_$abi

# 1. The dynamic symbol table.
soname=$(readelf -d "$LIBPMLMIG" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
[ "$soname" = "libpmlmig.so.$abi" ] && pass "SONAME $soname" || fail "SONAME is '$soname', not libpmlmig.so.$abi"

nm -D --defined-only "$LIBPMLMIG" >"$work/nm.txt"
failures_before_nm=$failures
declared=$(sed -n 's/^PMLMIG_API[^(]*\<\(pmlmig_[a-z0-9_]*\)(.*/\1/p' "$header" | sort -u)
exported=()
while read -r _addr type name; do
  [ -n "$name" ] || { name=$type; type=$_addr; }  # absolute symbols print no address
  if [ "$name" = "$node" ] && [ "$type" = A ]; then continue; fi  # the version node itself
  base=${name%%@*}
  if [ "$name" != "$base" ] && [ "$name" != "$base@@$node" ]; then
    fail "exported $name is not in version node $node"
  fi
  if [[ "$base" != pmlmig_* ]]; then
    fail "exported symbol $name ($type) is not pmlmig_*"
  elif ! grep -qx "$base" <<<"$declared"; then
    fail "exported $base is not declared PMLMIG_API in pmlmig.h"
  fi
  exported+=("$base")
done <"$work/nm.txt"
required=("${REQUIRED_SYMBOLS[@]}")
[ "${PMLMIG_PACKAGE_STRICT:-1}" = 1 ] && mapfile -t required <<<"$declared"
for s in "${required[@]}"; do
  printf '%s\n' "${exported[@]}" | grep -qx "$s" || fail "libpmlmig.so does not export $s"
done
pending=$(comm -23 <(echo "$declared") <(printf '%s\n' "${exported[@]}" | sort -u) | paste -sd' ')
echo "package_test: libpmlmig.so exports $(comm -12 <(echo "$declared") <(printf '%s\n' "${exported[@]}" | sort -u) | wc -l)" \
     "of the $(wc -l <<<"$declared") functions pmlmig.h declares"
[ -z "$pending" ] || echo "package_test: declared, not exported yet: $pending"
if [ "$failures" -eq "$failures_before_nm" ]; then
  pass "nm -D --defined-only lists only pmlmig_* (${#exported[@]} symbols)"
else
  sed 's/^/  nm: /' "$work/nm.txt" >&2
fi

# 2. The header on its own, as C11 and as C++.
printf '#include "pmlmig/pmlmig.h"\n' >"$work/header.c"
cp "$work/header.c" "$work/header.cc"
if "$CC" -std=c11 -Wall -Wextra -Werror -pedantic -fsyntax-only -I"$PMLMIG_SOURCE_DIR/include" "$work/header.c"; then
  pass "pmlmig.h compiles as C11 (-Wall -Wextra -Werror -pedantic)"
else
  fail "pmlmig.h does not compile as C11"
fi
if "$CXX" -std=c++20 -Wall -Wextra -Werror -fsyntax-only -I"$PMLMIG_SOURCE_DIR/include" "$work/header.cc"; then
  pass "pmlmig.h compiles as C++20 (-Wall -Wextra -Werror)"
else
  fail "pmlmig.h does not compile as C++20"
fi

# 3. A C program against the built library. It prints what the library says,
# which must be the header's version.
cat >"$work/version.c" <<'EOF'
#include <stdio.h>

#include <pmlmig/pmlmig.h>

int main(void) {
  unsigned v = pmlmig_version();
  printf("%u.%u.%u abi %u\n", (v >> 16) & 0xff, (v >> 8) & 0xff, v & 0xff, (unsigned)pmlmig_abi_version());
  return v == PMLMIG_VERSION && pmlmig_abi_version() == PMLMIG_ABI_VERSION ? 0 : 1;
}
EOF
libdir=$(dirname "$LIBPMLMIG")
if "$CC" -std=c11 -Wall -Wextra -Werror -pedantic "${test_flags[@]}" -I"$PMLMIG_SOURCE_DIR/include" \
     "$work/version.c" -o "$work/version" -L"$libdir" -lpmlmig -Wl,-rpath,"$libdir" &&
   out=$("$work/version") && [ "$out" = "$version abi $abi" ]; then
  pass "a C program links against the built libpmlmig.so: $out"
else
  fail "the C program against the built libpmlmig.so (said '${out:-}', expected '$version abi $abi')"
fi

# 4. The installed tree and its consumers. (The function's body is not
# indented because of its here-documents.)
installed() {
prefix=$work/prefix
if ! cmake --install "$PMLMIG_BUILD_DIR" --prefix "$prefix" >"$work/install.log" 2>&1; then
  cat "$work/install.log" >&2
  fail "cmake --install (is everything built?)"
  return 1
fi
(cd "$prefix" && find . \( -type f -o -type l \) | sort) >"$work/installed.txt"
lib=$(dirname "$(cd "$prefix" && find . -name "libpmlmig.so.$abi" | head -1)")
lib=${lib#./}
for f in "include/pmlmig/pmlmig.h" "include/pmlmig/engine/dirty_set.h" "include/pmlmig/base/status.h" \
         "$lib/libpmlmig.so" "$lib/libpmlmig.so.$abi" "$lib/libpmlmig.so.$version" \
         "$lib/libpmlmig_base.a" "$lib/libpmlmig_engine.a" "$lib/libpmlmig_vmm.a" "$lib/libpmlmig_transport.a" \
         "$lib/libpmlmig_proto.a" "$lib/cmake/pmlmig/pmlmigConfig.cmake" "$lib/cmake/pmlmig/pmlmigConfigVersion.cmake" \
         "$lib/cmake/pmlmig/pmlmig-engine-targets.cmake" "$lib/cmake/pmlmig/pmlmig-pmlmig-targets.cmake" \
         "$lib/pkgconfig/pmlmig.pc"; do
  grep -qx "./$f" "$work/installed.txt" || fail "the install has no $f"
done
[ "$(readlink "$prefix/$lib/libpmlmig.so")" = "libpmlmig.so.$abi" ] || fail "libpmlmig.so does not link to libpmlmig.so.$abi"
if grep -n -e '-Werror' -e 'pmlmig_flags' "$prefix/$lib"/cmake/pmlmig/*.cmake; then
  fail "pmlmig's warning flags are in the installed package"
fi
if grep -n -F -e "$PMLMIG_BUILD_DIR" -e "$PMLMIG_SOURCE_DIR/" "$prefix/$lib"/cmake/pmlmig/*.cmake "$prefix/$lib/pkgconfig/pmlmig.pc"; then
  fail "the installed package names the build or source tree"
fi
[ "$failures" -eq 0 ] && pass "installed to a temporary prefix ($(wc -l <"$work/installed.txt") files under $lib, include, ...)"
mm=${version%.*}

# (a) find_package(pmlmig) and pmlmig::pmlmig, from C. TBB and gRPC made
# unfindable: the shared library needs nothing found.
mkdir -p "$work/c-consumer"
cp "$work/version.c" "$work/c-consumer/main.c"
cat >"$work/c-consumer/CMakeLists.txt" <<EOF
cmake_minimum_required(VERSION 3.25)
project(pmlmig_c_consumer C)
find_package(pmlmig $mm REQUIRED)
add_executable(consumer main.c)
target_link_libraries(consumer PRIVATE pmlmig::pmlmig)
EOF
if configure_quiet "$work/c-consumer.log" -S "$work/c-consumer" -B "$work/c-consumer/b" -G Ninja \
     -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_C_COMPILER="$CC" -DCMAKE_C_FLAGS="${test_flags[*]}" \
     -DCMAKE_DISABLE_FIND_PACKAGE_TBB=ON -DCMAKE_DISABLE_FIND_PACKAGE_gRPC=ON &&
   cmake --build "$work/c-consumer/b" >"$work/c-consumer-build.log" 2>&1 &&
   out=$("$work/c-consumer/b/consumer") && [ "$out" = "$version abi $abi" ]; then
  pass "find_package(pmlmig $mm) + pmlmig::pmlmig from C: $out"
else
  cat "$work/c-consumer-build.log" >&2 || true
  fail "the find_package(pmlmig) C consumer"
fi

# (b) find_package(pmlmig COMPONENTS engine) and the static pmlmig::engine.
mkdir -p "$work/engine-consumer"
engine_consumer_source >"$work/engine-consumer/main.cc"
cat >"$work/engine-consumer/CMakeLists.txt" <<EOF
cmake_minimum_required(VERSION 3.25)
project(pmlmig_engine_consumer CXX)
find_package(pmlmig $mm REQUIRED COMPONENTS engine)
if(TARGET pmlmig::transport OR TARGET pmlmig::pmlmig)
  message(FATAL_ERROR "COMPONENTS engine loaded more than the engine")
endif()
add_executable(consumer main.cc)
target_link_libraries(consumer PRIVATE pmlmig::engine)
EOF
if configure_quiet "$work/engine-consumer.log" -S "$work/engine-consumer" -B "$work/engine-consumer/b" -G Ninja \
     -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_CXX_COMPILER="$CXX" -DCMAKE_CXX_FLAGS="${test_flags[*]}" \
     -DCMAKE_DISABLE_FIND_PACKAGE_gRPC=ON -DCMAKE_DISABLE_FIND_PACKAGE_Protobuf=ON &&
   cmake --build "$work/engine-consumer/b" >"$work/engine-consumer-build.log" 2>&1 &&
   out=$("$work/engine-consumer/b/consumer"); then
  pass "find_package(pmlmig COMPONENTS engine) + static pmlmig::engine from C++: $out"
else
  cat "$work/engine-consumer-build.log" >&2 || true
  fail "the find_package(pmlmig COMPONENTS engine) C++ consumer"
fi

# (c) find_package(pmlmig COMPONENTS transport): gRPC and protobuf found by
# the package for the static pmlmig::transport.
mkdir -p "$work/transport-consumer"
cat >"$work/transport-consumer/main.cc" <<'EOF'
#include <cstdio>

#include "pmlmig/transport/security.h"

int main() {
  bool loopback = pmlmig::transport::IsLoopbackListenAddress("127.0.0.1:7400");
  std::printf("transport consumer: 127.0.0.1:7400 is %sloopback\n", loopback ? "" : "not ");
  return loopback ? 0 : 1;
}
EOF
cat >"$work/transport-consumer/CMakeLists.txt" <<EOF
cmake_minimum_required(VERSION 3.25)
project(pmlmig_transport_consumer CXX)
find_package(pmlmig $mm REQUIRED COMPONENTS transport)
add_executable(consumer main.cc)
target_link_libraries(consumer PRIVATE pmlmig::transport)
EOF
if configure_quiet "$work/transport-consumer.log" -S "$work/transport-consumer" -B "$work/transport-consumer/b" -G Ninja \
     -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_CXX_COMPILER="$CXX" -DCMAKE_CXX_FLAGS="${test_flags[*]}" &&
   cmake --build "$work/transport-consumer/b" >"$work/transport-consumer-build.log" 2>&1 &&
   out=$("$work/transport-consumer/b/consumer"); then
  pass "find_package(pmlmig COMPONENTS transport) + static pmlmig::transport from C++: $out"
else
  cat "$work/transport-consumer-build.log" >&2 || true
  fail "the find_package(pmlmig COMPONENTS transport) C++ consumer"
fi

# (d) pkg-config.
export PKG_CONFIG_PATH="$prefix/$lib/pkgconfig"
if pcv=$(pkg-config --modversion pmlmig) && [ "$pcv" = "$version" ] &&
   read -r -a pc <<<"$(pkg-config --cflags --libs pmlmig)" &&
   "$CC" -std=c11 -Wall -Wextra -Werror -pedantic "${test_flags[@]}" "$work/version.c" -o "$work/pc-consumer" \
     "${pc[@]}" -Wl,-rpath,"$prefix/$lib" &&
   out=$("$work/pc-consumer") && [ "$out" = "$version abi $abi" ]; then
  pass "pkg-config pmlmig ($pcv: ${pc[*]//$prefix/PREFIX}): $out"
else
  fail "the pkg-config consumer (pmlmig.pc version '${pcv:-}')"
fi

}
if [ "${PMLMIG_INSTALL:-ON}" != ON ] || [ -z "${PMLMIG_BUILD_DIR:-}" ]; then
  echo "package_test: no install rules in this build (PMLMIG_INSTALL=${PMLMIG_INSTALL:-}): install checks skipped"
else
  installed || true
fi

# 5. add_subdirectory.
subdirectory "$PMLMIG_SOURCE_DIR" || true

if [ "$failures" -gt 0 ]; then
  echo "package_test: $failures check(s) failed" >&2
  exit 1
fi
echo "package_test: all checks passed"

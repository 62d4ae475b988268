# The plain C libraries pmlmig links: xxhash (engine), lz4 and zstd
# (transport). They are found one way everywhere, through pkg-config, as the
# imported targets PkgConfig::pmlmig_<name>: by pmlmig's own build (the
# top-level CMakeLists.txt) and, from the installed copy of this file, by
# pmlmigConfig.cmake for an embedder that links the static libraries.
# (Debian's libxxhash-dev, liblz4-dev and libzstd-dev ship the .pc files;
# none of the three ships a CMake package everywhere.)
#
#   pmlmig_find_c_library(<name> <pkg-config module> [REQUIRED] [QUIET])
#
# sets pmlmig_<name>_FOUND and, when found, defines PkgConfig::pmlmig_<name>.
# The caller has found PkgConfig already.
macro(pmlmig_find_c_library _pmlmig_name _pmlmig_module)
  pkg_check_modules(pmlmig_${_pmlmig_name} ${ARGN} IMPORTED_TARGET ${_pmlmig_module})
endmacro()

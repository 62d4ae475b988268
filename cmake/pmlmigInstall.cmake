# What `cmake --install` puts in place (PMLMIG_INSTALL; included from the
# top-level CMakeLists.txt after every target is defined):
#   include/pmlmig/**                  the public headers (C ABI and C++ API)
#   lib/libpmlmig.so.1 (+ links)       the C ABI, when built (not ENGINE_ONLY)
#   lib/libpmlmig_<component>.a        the static libraries built
#   lib/cmake/pmlmig/                  pmlmigConfig.cmake, its version file,
#                                      one targets file per component
#   lib/pkgconfig/pmlmig.pc            for libpmlmig.so, when built
#   bin/pmlmig                         the command, when built
# ("lib" is CMAKE_INSTALL_LIBDIR: lib/x86_64-linux-gnu for a /usr prefix on
# Debian.) tests/tools/package_test.sh installs to a temporary prefix and builds
# consumers against it.
include(CMakePackageConfigHelpers)

set(PMLMIG_CMAKE_DIR ${CMAKE_INSTALL_LIBDIR}/cmake/pmlmig)

install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/pmlmig DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})

# One export set (and targets file) per component, so that an embedder who
# asks for the engine alone never needs gRPC found. pmlmig_proto travels with
# transport, which links it.
set(_pmlmig_components base engine)
install(TARGETS pmlmig_base EXPORT pmlmig-base-targets ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR})
install(TARGETS pmlmig_engine EXPORT pmlmig-engine-targets ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR})
if(TARGET pmlmig_vmm)
  list(APPEND _pmlmig_components vmm)
  install(TARGETS pmlmig_vmm EXPORT pmlmig-vmm-targets ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR})
endif()
if(TARGET pmlmig_transport)
  list(APPEND _pmlmig_components transport)
  install(TARGETS pmlmig_proto pmlmig_transport EXPORT pmlmig-transport-targets
          ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR})
endif()
if(TARGET pmlmig_shared)
  list(APPEND _pmlmig_components pmlmig)
  install(TARGETS pmlmig_shared EXPORT pmlmig-pmlmig-targets
          LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
          RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
  set(PMLMIG_DEFAULT_COMPONENTS pmlmig)
else()
  # An engine-only installation: no C ABI, so the static libraries it has.
  set(PMLMIG_DEFAULT_COMPONENTS ${_pmlmig_components})
endif()
if(TARGET pmlmig)
  install(TARGETS pmlmig RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
endif()
foreach(_c IN LISTS _pmlmig_components)
  install(EXPORT pmlmig-${_c}-targets NAMESPACE pmlmig:: DESTINATION ${PMLMIG_CMAKE_DIR})
endforeach()

# @...@ lists for the config template, space-separated (read back as lists).
string(JOIN " " PMLMIG_INSTALLED_COMPONENTS ${_pmlmig_components})
string(JOIN " " PMLMIG_DEFAULT_COMPONENTS ${PMLMIG_DEFAULT_COMPONENTS})
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/pmlmigConfig.cmake.in
  ${PROJECT_BINARY_DIR}/cmake/pmlmigConfig.cmake
  INSTALL_DESTINATION ${PMLMIG_CMAKE_DIR})
# While the major version is 0, a minor release may change the C++ API and the
# static libraries (docs/EMBEDDING.md), so a request for 0.2 accepts 0.2.x
# only. At 1.0 this becomes SameMajorVersion. (The C ABI's compatibility is
# the SONAME's business, libpmlmig.so.${PMLMIG_ABI_VERSION}, not this file's.)
write_basic_package_version_file(${PROJECT_BINARY_DIR}/cmake/pmlmigConfigVersion.cmake
  VERSION ${PROJECT_VERSION}
  COMPATIBILITY SameMinorVersion)
install(FILES
  ${PROJECT_BINARY_DIR}/cmake/pmlmigConfig.cmake
  ${PROJECT_BINARY_DIR}/cmake/pmlmigConfigVersion.cmake
  ${PROJECT_SOURCE_DIR}/cmake/pmlmigCLibraries.cmake
  DESTINATION ${PMLMIG_CMAKE_DIR})

if(TARGET pmlmig_shared)
  set(_pc_dir ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
  if(IS_ABSOLUTE "${CMAKE_INSTALL_LIBDIR}" OR IS_ABSOLUTE "${CMAKE_INSTALL_INCLUDEDIR}")
    set(PMLMIG_PC_PREFIX "${CMAKE_INSTALL_PREFIX}")
    set(PMLMIG_PC_LIBDIR "${CMAKE_INSTALL_FULL_LIBDIR}")
    set(PMLMIG_PC_INCLUDEDIR "${CMAKE_INSTALL_FULL_INCLUDEDIR}")
  else()
    # Relocatable: the prefix is found from where pmlmig.pc lies.
    file(RELATIVE_PATH _pc_up "/pmlmig/${_pc_dir}" "/pmlmig")
    string(REGEX REPLACE "/$" "" _pc_up "${_pc_up}")
    set(PMLMIG_PC_PREFIX "\${pcfiledir}/${_pc_up}")
    set(PMLMIG_PC_LIBDIR "\${prefix}/${CMAKE_INSTALL_LIBDIR}")
    set(PMLMIG_PC_INCLUDEDIR "\${prefix}/${CMAKE_INSTALL_INCLUDEDIR}")
  endif()
  set(PMLMIG_PC_LIBS_PRIVATE "-lgrpc++ -lprotobuf -ltbb -llz4 -lzstd -lxxhash -pthread")
  configure_file(${PROJECT_SOURCE_DIR}/cmake/pmlmig.pc.in ${PROJECT_BINARY_DIR}/cmake/pmlmig.pc @ONLY)
  install(FILES ${PROJECT_BINARY_DIR}/cmake/pmlmig.pc DESTINATION ${_pc_dir})
endif()

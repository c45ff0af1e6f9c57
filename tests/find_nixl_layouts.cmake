# cmake -DSOURCE_DIR=<project> -DWORK=<scratch dir> -P find_nixl_layouts.cmake
# NIXL installed with lib/<multiarch>, lib64 or lib: the plugin's build finds its libraries in
# each layout.
cmake_minimum_required(VERSION 3.22)
include(${SOURCE_DIR}/cmake/TcpxFindNixl.cmake)
set(CMAKE_LIBRARY_ARCHITECTURE x86_64-linux-gnu)
file(REMOVE_RECURSE ${WORK})
set(index 0)
foreach(layout lib/x86_64-linux-gnu lib64 lib)
  math(EXPR index "${index} + 1")
  set(prefix ${WORK}/prefix${index})
  file(MAKE_DIRECTORY ${prefix}/${layout})
  file(TOUCH ${prefix}/${layout}/libnixl.so ${prefix}/${layout}/libnixl_build.so)
  tcpx_find_nixl_libraries(PREFIX ${prefix} NIXL found_nixl NIXL_BUILD found_build)
  if(NOT found_nixl STREQUAL "${prefix}/${layout}/libnixl.so" OR
     NOT found_build STREQUAL "${prefix}/${layout}/libnixl_build.so")
    message(FATAL_ERROR "layout ${layout}: found '${found_nixl}' and '${found_build}'")
  endif()
  message(STATUS "layout ${layout}: ${found_nixl}")
endforeach()

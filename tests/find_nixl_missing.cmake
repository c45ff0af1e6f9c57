# cmake -DSOURCE_DIR=<project> -P find_nixl_missing.cmake: fails with the folders it searched.
cmake_minimum_required(VERSION 3.22)
include(${SOURCE_DIR}/cmake/TcpxFindNixl.cmake)
set(CMAKE_LIBRARY_ARCHITECTURE x86_64-linux-gnu)
tcpx_find_nixl_libraries(PREFIX /nonexistent/nixl NIXL found_nixl NIXL_BUILD found_build)

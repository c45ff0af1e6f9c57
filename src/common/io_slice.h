// One contiguous piece of memory that a request moves or a list of pieces is made of.
#pragma once

#include <cstddef>

namespace tcpx {

struct IoSlice {
  void* data = nullptr;
  size_t size = 0;
};

}  // namespace tcpx

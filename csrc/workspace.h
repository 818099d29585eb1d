// The backward workspace budget every CUDA op reads: CLIP_FAST_WORKSPACE_MB (the Triton
// backends' variable too), default 256 MiB.  Included by the host .cpp files only.
#pragma once

#include <c10/util/Exception.h>

#include <cmath>
#include <cstdlib>

namespace clip_fast {

constexpr double kDefaultWorkspaceMB = 256.0;

inline double workspace_bytes() {
  const char* env = std::getenv("CLIP_FAST_WORKSPACE_MB");
  double mb = kDefaultWorkspaceMB;
  if (env != nullptr && *env != '\0') {
    char* end = nullptr;
    const double v = std::strtod(env, &end);
    TORCH_CHECK(end != env && *end == '\0' && v > 0.0 && std::isfinite(v),
                "clip_fast cuda: CLIP_FAST_WORKSPACE_MB must be a positive number, got '", env, "'");
    mb = v;
  }
  return mb * 1048576.0;
}

}  // namespace clip_fast

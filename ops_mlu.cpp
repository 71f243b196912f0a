// NMS and ROIAlign (forward and backward) for this repo's Faster R-CNN, registered with the PyTorch dispatcher as
// torch.ops.frcnn_ops.{nms, roi_align_forward, roi_align_backward}. ops.py JIT-builds this file on first use;
// there is no setup.py (upstream maskrcnn-benchmark's `_C` build step was its most reported failure).
//
// Semantics follow torchvision.ops (the reference the tests compare against), which for ROIAlign with
// aligned=False is exactly maskrcnn-benchmark's legacy kernel. The CPU kernels are always built; the MLU kernels
// live in one `#ifdef WITH_MLU` block at the end, compiled only when ops.py found torch_mlu and its headers, so
// nothing MLU-related can break the CPU build.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <vector>

namespace {

// ---------------------------------------------------------------------------------------------------------------
// NMS (CPU)
//
// Order: one stable sort by descending score, so equal scores keep the lower original index first (the documented
// tie rule). A candidate is suppressed when its IoU with an already kept box of the same label is > threshold
// (torchvision's and upstream's CUDA rule; upstream's CPU kernel used >=). Checking each candidate against the kept
// boxes, stopping at the first suppressor, is the same decision as torchvision's "each kept box suppresses all
// later ones" but touches far fewer pairs when boxes overlap. The IoU arithmetic is torchvision's, term for term,
// so results are bit-identical: a zero-area box gives 0/0 = NaN, which is never > threshold.
// offset = 1 is upstream's legacy +1 convention (maskrcnn_benchmark/csrc/cpu/nms_cpu.cpp): widths, heights and
// intersections all get +1. labels (dense ids 0..L-1, optional) restrict suppression to boxes of the same label (batched_nms).

template <typename T>
at::Tensor nms_cpu_kernel(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold, T offset,
                          const int64_t* labels, int64_t num_labels) {
  const int64_t n = boxes.size(0);
  const at::Tensor order = std::get<1>(at::sort(scores, /*stable=*/true, /*dim=*/0, /*descending=*/true));
  const int64_t* ord = order.data_ptr<int64_t>();
  const T* b = boxes.data_ptr<T>();

  // Kept boxes per label, structure-of-arrays so the inner loop streams through memory.
  struct Kept { std::vector<T> x1, y1, x2, y2, area; };
  std::vector<Kept> kept(num_labels);
  std::vector<int64_t> keep;
  keep.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t j = ord[i];
    const T jx1 = b[4 * j], jy1 = b[4 * j + 1], jx2 = b[4 * j + 2], jy2 = b[4 * j + 3];
    const T jarea = (jx2 - jx1 + offset) * (jy2 - jy1 + offset);
    Kept& k = kept[labels ? labels[j] : 0];
    const int64_t nk = static_cast<int64_t>(k.x1.size());
    const T *kx1 = k.x1.data(), *ky1 = k.y1.data(), *kx2 = k.x2.data(), *ky2 = k.y2.data(), *ka = k.area.data();
    bool suppressed = false;
    for (int64_t m = 0; m < nk; ++m) {
      const T w = std::max(static_cast<T>(0), std::min(kx2[m], jx2) - std::max(kx1[m], jx1) + offset);
      const T h = std::max(static_cast<T>(0), std::min(ky2[m], jy2) - std::max(ky1[m], jy1) + offset);
      const T inter = w * h;
      const T iou = inter / (ka[m] + jarea - inter);  // kept area first, as torchvision adds iarea + areas[j]
      if (iou > iou_threshold) {
        suppressed = true;
        break;
      }
    }
    if (!suppressed) {
      k.x1.push_back(jx1); k.y1.push_back(jy1); k.x2.push_back(jx2); k.y2.push_back(jy2); k.area.push_back(jarea);
      keep.push_back(j);
    }
  }
  return at::tensor(keep, boxes.options().dtype(at::kLong));
}

at::Tensor nms_cpu(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold, double offset,
                   const c10::optional<at::Tensor>& labels) {
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4, "nms: boxes must be (N, 4), got ", boxes.sizes());
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == boxes.size(0),
              "nms: scores must be (N,) with N = ", boxes.size(0), ", got ", scores.sizes());
  TORCH_CHECK(boxes.scalar_type() == scores.scalar_type(), "nms: boxes and scores dtypes differ: ",
              boxes.scalar_type(), " vs ", scores.scalar_type());
  if (boxes.size(0) == 0) return at::empty({0}, boxes.options().dtype(at::kLong));
  const at::Tensor b = boxes.contiguous(), s = scores.contiguous();
  at::Tensor lab;
  int64_t num_labels = 1;
  if (labels.has_value() && labels->defined()) {
    lab = labels->to(at::kLong).contiguous();
    TORCH_CHECK(lab.dim() == 1 && lab.size(0) == b.size(0), "nms: labels must be (N,), got ", lab.sizes());
    num_labels = lab.max().item<int64_t>() + 1;
    TORCH_CHECK(lab.min().item<int64_t>() >= 0, "nms: labels must be dense ids >= 0 (ops.py makes them so)");
  }
  at::Tensor keep;
  AT_DISPATCH_FLOATING_TYPES(b.scalar_type(), "frcnn_ops::nms", [&] {
    keep = nms_cpu_kernel<scalar_t>(b, s, iou_threshold, static_cast<scalar_t>(offset),
                                    lab.defined() ? lab.data_ptr<int64_t>() : nullptr, num_labels);
  });
  return keep;
}

// ---------------------------------------------------------------------------------------------------------------
// ROIAlign (CPU)
//
// Geometry is torchvision's roi_align (torchvision/csrc/ops/cpu/roi_align_kernel.cpp; with aligned=False exactly
// maskrcnn-benchmark's legacy maskrcnn_benchmark/csrc/cpu/ROIAlign_cpu.cpp): corners scaled with no half-pixel shift (aligned=False) or shifted by -0.5
// (aligned=True); roi size clamped to >= 1 only when aligned=False; bin = roi / pooled; adaptive grid =
// ceil(roi / pooled); a sample with y < -1 or y > H (or x likewise) contributes 0 but still counts in the divisor;
// otherwise coordinates are clamped into the map. The bilinear taps depend only on the RoI, not the channel, so
// they are computed once per RoI (torchvision's pre_calc idea) and reused for every channel.

template <typename T>
struct Tap {  // one sampling point: four plane offsets and their bilinear weights
  int p1, p2, p3, p4;
  T w1, w2, w3, w4;
};

template <typename T>
struct RoiGeometry {
  int64_t batch;
  T start_h, start_w, bin_h, bin_w;
  int grid_h, grid_w;
  T count;
};

template <typename T>
RoiGeometry<T> roi_geometry(const T* roi, double spatial_scale, int64_t pooled_h, int64_t pooled_w,
                            int64_t sampling_ratio, bool aligned) {
  RoiGeometry<T> g;
  g.batch = static_cast<int64_t>(roi[0]);
  const T shift = aligned ? static_cast<T>(0.5) : static_cast<T>(0.0);
  // Scaled in double and rounded to T, as torchvision does (spatial_scale is a double there too).
  g.start_w = roi[1] * spatial_scale - shift;
  g.start_h = roi[2] * spatial_scale - shift;
  const T end_w = roi[3] * spatial_scale - shift;
  const T end_h = roi[4] * spatial_scale - shift;
  T roi_w = end_w - g.start_w, roi_h = end_h - g.start_h;
  if (!aligned) {  // legacy quirk: a degenerate RoI is widened to one feature pixel
    roi_w = std::max(roi_w, static_cast<T>(1));
    roi_h = std::max(roi_h, static_cast<T>(1));
  }
  g.bin_h = roi_h / static_cast<T>(pooled_h);
  g.bin_w = roi_w / static_cast<T>(pooled_w);
  g.grid_h = sampling_ratio > 0 ? static_cast<int>(sampling_ratio) : static_cast<int>(std::ceil(roi_h / pooled_h));
  g.grid_w = sampling_ratio > 0 ? static_cast<int>(sampling_ratio) : static_cast<int>(std::ceil(roi_w / pooled_w));
  g.count = static_cast<T>(std::max(g.grid_h * g.grid_w, 1));  // aligned=True with an inverted RoI: no samples
  return g;
}

// Fills taps in (ph, pw, iy, ix) order; returns how many were written (pooled_h * pooled_w * grid_h * grid_w).
template <typename T>
int64_t roi_taps(const RoiGeometry<T>& g, int64_t height, int64_t width, int64_t pooled_h, int64_t pooled_w,
                 std::vector<Tap<T>>& taps) {
  const int64_t gh = std::max(g.grid_h, 0), gw = std::max(g.grid_w, 0);
  taps.resize(static_cast<size_t>(pooled_h * pooled_w * gh * gw));
  int64_t t = 0;
  for (int64_t ph = 0; ph < pooled_h; ++ph)
    for (int64_t pw = 0; pw < pooled_w; ++pw)
      for (int64_t iy = 0; iy < gh; ++iy) {
        const T yy = g.start_h + ph * g.bin_h + static_cast<T>(iy + .5f) * g.bin_h / static_cast<T>(g.grid_h);
        for (int64_t ix = 0; ix < gw; ++ix, ++t) {
          const T xx = g.start_w + pw * g.bin_w + static_cast<T>(ix + .5f) * g.bin_w / static_cast<T>(g.grid_w);
          T y = yy, x = xx;
          Tap<T>& tap = taps[t];
          if (y < -1.0 || y > height || x < -1.0 || x > width) {  // outside: weight 0, still in the divisor
            tap = Tap<T>{0, 0, 0, 0, 0, 0, 0, 0};
            continue;
          }
          if (y <= 0) y = 0;
          if (x <= 0) x = 0;
          int y_low = static_cast<int>(y), x_low = static_cast<int>(x), y_high, x_high;
          if (y_low >= height - 1) {
            y_high = y_low = static_cast<int>(height - 1);
            y = static_cast<T>(y_low);
          } else {
            y_high = y_low + 1;
          }
          if (x_low >= width - 1) {
            x_high = x_low = static_cast<int>(width - 1);
            x = static_cast<T>(x_low);
          } else {
            x_high = x_low + 1;
          }
          const T ly = y - y_low, lx = x - x_low, hy = 1. - ly, hx = 1. - lx;
          const int w = static_cast<int>(width);
          tap = Tap<T>{y_low * w + x_low, y_low * w + x_high, y_high * w + x_low, y_high * w + x_high,
                       hy * hx, hy * lx, ly * hx, ly * lx};
        }
      }
  return t;
}

void check_roi_args(const at::Tensor& rois, int64_t pooled_h, int64_t pooled_w) {
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5, "roi_align: rois must be (K, 5), got ", rois.sizes());
  TORCH_CHECK(pooled_h > 0 && pooled_w > 0, "roi_align: output size must be positive, got ", pooled_h, "x",
              pooled_w);
}

template <typename T>
void roi_align_forward_nhwc(const T* in, const T* rp, T* out, int64_t batch, int64_t num_rois, int64_t channels,
                            int64_t height, int64_t width, double spatial_scale, int64_t pooled_h, int64_t pooled_w,
                            int64_t sampling_ratio, bool aligned) {
  const int64_t bins = pooled_h * pooled_w;
  at::parallel_for(0, num_rois, 1, [&](int64_t begin, int64_t end) {
    std::vector<Tap<T>> taps;
    std::vector<T> acc(channels);
    for (int64_t k = begin; k < end; ++k) {
      const auto g = roi_geometry<T>(rp + 5 * k, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned);
      TORCH_CHECK(g.batch >= 0 && g.batch < batch, "roi_align: roi ", k, " has batch index ", g.batch,
                  " outside [0, ", batch, ")");
      roi_taps(g, height, width, pooled_h, pooled_w, taps);
      const int64_t per_bin = static_cast<int64_t>(taps.size()) / bins;
      const T* base = in + g.batch * height * width * channels;
      const Tap<T>* tp = taps.data();
      for (int64_t bin = 0; bin < bins; ++bin) {
        T* a = acc.data();
        std::fill(a, a + channels, static_cast<T>(0));
        for (int64_t s = 0; s < per_bin; ++s, ++tp) {
          const T *q1 = base + tp->p1 * channels, *q2 = base + tp->p2 * channels;
          const T *q3 = base + tp->p3 * channels, *q4 = base + tp->p4 * channels;
          const T w1 = tp->w1, w2 = tp->w2, w3 = tp->w3, w4 = tp->w4;
          for (int64_t c = 0; c < channels; ++c)  // per channel the same expression as the NCHW loop
            a[c] += w1 * q1[c] + w2 * q2[c] + w3 * q3[c] + w4 * q4[c];
        }
        T* o = out + k * channels * bins + bin;
        for (int64_t c = 0; c < channels; ++c) o[c * bins] = a[c] / g.count;
      }
    }
  });
}

at::Tensor roi_align_forward_cpu(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                                 int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio, bool aligned) {
  TORCH_CHECK(input.dim() == 4, "roi_align: input must be (N, C, H, W), got ", input.sizes());
  check_roi_args(rois, pooled_h, pooled_w);
  TORCH_CHECK(input.scalar_type() == rois.scalar_type(), "roi_align: input and rois dtypes differ: ",
              input.scalar_type(), " vs ", rois.scalar_type());
  const int64_t num_rois = rois.size(0), channels = input.size(1), height = input.size(2), width = input.size(3);
  TORCH_CHECK(height * width < INT_MAX, "roi_align: feature plane too large for 32-bit offsets");
  at::Tensor output = at::zeros({num_rois, channels, pooled_h, pooled_w}, input.options());
  if (output.numel() == 0) return output;
  const at::Tensor r = rois.contiguous();
  // Two loop orders, equal bits. Channels-last input (N,H,W,C) lets the innermost loop run over contiguous
  // channels, which the compiler vectorises; it pays off once the RoIs' taps outnumber the feature pixels, which
  // covers the transpose (free when the input already is channels_last). Otherwise gather from NCHW planes.
  const int64_t grid_guess = sampling_ratio > 0 ? sampling_ratio * sampling_ratio : 4;
  const bool nhwc = input.is_contiguous(at::MemoryFormat::ChannelsLast) ||
                    num_rois * pooled_h * pooled_w * grid_guess * 4 > input.size(0) * height * width;
  if (nhwc) {
    const at::Tensor x = input.permute({0, 2, 3, 1}).contiguous();  // (N, H, W, C)
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "frcnn_ops::roi_align_forward_nhwc", [&] {
      roi_align_forward_nhwc<scalar_t>(x.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(),
                                       output.data_ptr<scalar_t>(), x.size(0), num_rois, channels, height, width,
                                       spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned);
    });
    return output;
  }
  const at::Tensor x = input.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "frcnn_ops::roi_align_forward", [&] {
    const scalar_t* in = x.data_ptr<scalar_t>();
    const scalar_t* rp = r.data_ptr<scalar_t>();
    scalar_t* out = output.data_ptr<scalar_t>();
    const int64_t bins = pooled_h * pooled_w, plane = height * width;
    // Parallel over RoIs: each RoI writes only its own output rows, so no synchronisation is needed.
    at::parallel_for(0, num_rois, 1, [&](int64_t begin, int64_t end) {
      std::vector<Tap<scalar_t>> taps;
      for (int64_t k = begin; k < end; ++k) {
        const auto g = roi_geometry<scalar_t>(rp + 5 * k, spatial_scale, pooled_h, pooled_w, sampling_ratio,
                                              aligned);
        TORCH_CHECK(g.batch >= 0 && g.batch < x.size(0), "roi_align: roi ", k, " has batch index ", g.batch,
                    " outside [0, ", x.size(0), ")");
        roi_taps(g, height, width, pooled_h, pooled_w, taps);
        const int64_t per_bin = static_cast<int64_t>(taps.size()) / bins;
        for (int64_t c = 0; c < channels; ++c) {
          const scalar_t* p = in + (g.batch * channels + c) * plane;
          scalar_t* o = out + (k * channels + c) * bins;
          const Tap<scalar_t>* tp = taps.data();
          for (int64_t bin = 0; bin < bins; ++bin) {
            scalar_t v = 0;
            for (int64_t s = 0; s < per_bin; ++s, ++tp)  // same expression order as torchvision: equal bits
              v += tp->w1 * p[tp->p1] + tp->w2 * p[tp->p2] + tp->w3 * p[tp->p3] + tp->w4 * p[tp->p4];
            o[bin] = v / g.count;
          }
        }
      }
    });
  });
  return output;
}

at::Tensor roi_align_backward_cpu(const at::Tensor& grad, const at::Tensor& rois, double spatial_scale,
                                  int64_t pooled_h, int64_t pooled_w, int64_t batch_size, int64_t channels,
                                  int64_t height, int64_t width, int64_t sampling_ratio, bool aligned) {
  check_roi_args(rois, pooled_h, pooled_w);
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == rois.size(0) && grad.size(1) == channels &&
                  grad.size(2) == pooled_h && grad.size(3) == pooled_w,
              "roi_align_backward: grad must be (K, C, ph, pw) = (", rois.size(0), ", ", channels, ", ", pooled_h,
              ", ", pooled_w, "), got ", grad.sizes());
  TORCH_CHECK(height * width < INT_MAX, "roi_align: feature plane too large for 32-bit offsets");
  at::Tensor grad_input = at::zeros({batch_size, channels, height, width}, grad.options());
  const int64_t num_rois = rois.size(0);
  if (num_rois == 0 || grad_input.numel() == 0) return grad_input;
  const at::Tensor g_out = grad.contiguous(), r = rois.to(grad.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES(g_out.scalar_type(), "frcnn_ops::roi_align_backward", [&] {
    const scalar_t* go = g_out.data_ptr<scalar_t>();
    const scalar_t* rp = r.data_ptr<scalar_t>();
    scalar_t* gi = grad_input.data_ptr<scalar_t>();
    const int64_t bins = pooled_h * pooled_w, plane = height * width;
    for (int64_t k = 0; k < num_rois; ++k) {
      const int64_t b = static_cast<int64_t>(rp[5 * k]);
      TORCH_CHECK(b >= 0 && b < batch_size, "roi_align: roi ", k, " has batch index ", b, " outside [0, ",
                  batch_size, ")");
    }
    // Parallel over channels: a thread owns whole channel planes of grad_input, so the scatter-add needs no
    // atomics. Each thread recomputes the per-RoI taps (cheap next to the channel loop) and visits RoIs, bins and
    // samples in torchvision's order, so every plane accumulates in the same order and the result is bit-equal.
    at::parallel_for(0, channels, 1, [&](int64_t c_begin, int64_t c_end) {
      std::vector<Tap<scalar_t>> taps;
      for (int64_t k = 0; k < num_rois; ++k) {
        const auto g = roi_geometry<scalar_t>(rp + 5 * k, spatial_scale, pooled_h, pooled_w, sampling_ratio,
                                              aligned);
        roi_taps(g, height, width, pooled_h, pooled_w, taps);
        const int64_t per_bin = static_cast<int64_t>(taps.size()) / bins;
        for (int64_t c = c_begin; c < c_end; ++c) {
          scalar_t* p = gi + (g.batch * channels + c) * plane;
          const scalar_t* gb = go + (k * channels + c) * bins;
          const Tap<scalar_t>* tp = taps.data();
          for (int64_t bin = 0; bin < bins; ++bin) {
            const scalar_t gv = gb[bin];
            for (int64_t s = 0; s < per_bin; ++s, ++tp) {
              // Outside samples (the only taps whose four weights are all 0) are skipped, as torchvision does.
              if (tp->w1 == 0 && tp->w2 == 0 && tp->w3 == 0 && tp->w4 == 0) continue;
              p[tp->p1] += gv * tp->w1 / g.count;
              p[tp->p2] += gv * tp->w2 / g.count;
              p[tp->p3] += gv * tp->w3 / g.count;
              p[tp->p4] += gv * tp->w4 / g.count;
            }
          }
        }
      }
    });
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY(frcnn_ops, m) {
  m.def("nms(Tensor boxes, Tensor scores, float iou_threshold, float offset=0, Tensor? labels=None) -> Tensor");
  m.def("roi_align_forward(Tensor input, Tensor rois, float spatial_scale, int pooled_height, int pooled_width, "
        "int sampling_ratio, bool aligned) -> Tensor");
  m.def("roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, int pooled_height, int pooled_width, "
        "int batch_size, int channels, int height, int width, int sampling_ratio, bool aligned) -> Tensor");
}

TORCH_LIBRARY_IMPL(frcnn_ops, CPU, m) {
  m.impl("nms", &nms_cpu);
  m.impl("roi_align_forward", &roi_align_forward_cpu);
  m.impl("roi_align_backward", &roi_align_backward_cpu);
}

// ---------------------------------------------------------------------------------------------------------------
// MLU kernels (Cambricon), compiled only with -DWITH_MLU, which ops.py adds once torch_mlu imported and cnnl.h was
// found. Targets torch_mlu >= 1.22 (PyTorch >= 2.1, PrivateUse1 key) and CNNL 1.2x or 2.x. Every call below follows
// a Cambricon call site: torch_mlu's own torchvision kernels (torch_mlu/csrc/aten/operators/cnnl/{nms,roi_align}.cpp
// and internal/{nms,roi_align}_internal.cpp; r1.22 for CNNL 1.2x, r2.4_develop for CNNL 2.0), mmcv's
// mmcv/ops/csrc/pytorch/mlu/roi_align_mlu.cpp and mlu-ops' kernels/nms/nms.cpp. CI compiles this section against
// declarations of both generations (fake_cnnl.h, test_mlu.py) and runs it on a stand-in device that emulates CNNL's
// documented contract; on a real MLU, ops.py runs a one-time self-test against the CPU kernels before routing any
// tensor here. ops_mlu.py (Python) makes the inputs CNNL-safe: valid boxes, positive distinct scores, the IoU
// threshold as CNNL compares it, sanitised RoIs, sampling ratio >= 0. Device pointers come from data_ptr(), which
// equals torch_mlu's mlu_data_ptr for float and int32 (torch_mlu/csrc/aten/utils/tensor_util.cpp: storage pointer plus
// element size times offset, and only double is narrowed on chip); double/long never reach CNNL.
#ifdef WITH_MLU
#include "aten/cnnl/cnnlHandle.h"
#include "cnnl.h"
#include "framework/core/MLUStream.h"
#include "framework/core/mlu_guard.h"

#if !defined(CNNL_MAJOR)
#error "cnnl.h defines no CNNL_MAJOR; this CNNL is too old for ops_mlu.cpp (ops.py falls back)"
#endif

namespace {
namespace mlu {

#define FRCNN_CNNL_CHECK(expr)                                                                  \
  do {                                                                                          \
    const cnnlStatus_t status_ = (expr);                                                        \
    TORCH_CHECK(status_ == CNNL_STATUS_SUCCESS, #expr " failed: ", cnnlGetErrorString(status_)); \
  } while (0)

cnnlDataType_t cnnl_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return CNNL_DTYPE_FLOAT;
    case at::kHalf: return CNNL_DTYPE_HALF;
    case at::kInt: return CNNL_DTYPE_INT32;
    default: TORCH_CHECK(false, "frcnn_ops MLU: unsupported dtype ", t.scalar_type(), " (float, half, int32)");
  }
  return CNNL_DTYPE_INVALID;
}

// A zeroed channels_last (NHWC) tensor. Not at::zeros(sizes, options.memory_format(ChannelsLast)): aten::zeros has
// no memory-format argument, so that silently gives contiguous NCHW strides, which the NHWC descriptor below
// refuses. Empty in the format, then zero, as mmcv's roi_align_mlu.cpp does.
at::Tensor zeros_channels_last(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options, at::MemoryFormat::ChannelsLast).zero_();
}

// RAII tensor descriptor. A 4-D tensor is described NHWC (it must be channels_last contiguous); anything else as
// a dense ARRAY (torch_mlu/csrc/aten/cnnl/cnnlTensorDescriptors.cpp reorders channels_last sizes to N, H, W, C).
struct TensorDesc {
  cnnlTensorDescriptor_t desc = nullptr;
  explicit TensorDesc(const at::Tensor& t) {
    FRCNN_CNNL_CHECK(cnnlCreateTensorDescriptor(&desc));
    std::vector<int> dims;
    cnnlTensorLayout_t layout = CNNL_LAYOUT_ARRAY;
    if (t.dim() == 4) {
      TORCH_CHECK(t.is_contiguous(at::MemoryFormat::ChannelsLast), "frcnn_ops MLU: 4-D tensors must be channels_last, "
                  "got strides ", t.strides(), " for sizes ", t.sizes());
      dims = {int(t.size(0)), int(t.size(2)), int(t.size(3)), int(t.size(1))};
      layout = CNNL_LAYOUT_NHWC;
    } else {
      TORCH_CHECK(t.is_contiguous(), "frcnn_ops MLU: tensors must be contiguous");
      for (int64_t s : t.sizes()) dims.push_back(int(s));
    }
    FRCNN_CNNL_CHECK(cnnlSetTensorDescriptor(desc, layout, cnnl_dtype(t), int(dims.size()), dims.data()));
  }
  ~TensorDesc() { if (desc) cnnlDestroyTensorDescriptor(desc); }
  TensorDesc(const TensorDesc&) = delete;
  TensorDesc& operator=(const TensorDesc&) = delete;
};

struct NmsDesc {
  cnnlNmsDescriptor_t desc = nullptr;
  NmsDesc() { FRCNN_CNNL_CHECK(cnnlCreateNmsDescriptor(&desc)); }
  ~NmsDesc() { if (desc) cnnlDestroyNmsDescriptor(desc); }
};

struct RoiAlignDesc {
  cnnlRoiAlignDescriptor_t desc = nullptr;
  RoiAlignDesc() { FRCNN_CNNL_CHECK(cnnlCreateRoiAlignDescriptor(&desc)); }
  ~RoiAlignDesc() { if (desc) cnnlDestroyRoiAlignDescriptor(desc); }
};

// Inputs come from ops_mlu.py: valid boxes (x1 < x2, y1 < y2) with any legacy +1 already added to x2, y2, scores
// positive and distinct in the order wanted, and iou_threshold already the float32 value at which CNNL's
// "drop at IoU >= t" equals torchvision's "drop at IoU > t". Labels go through the coordinate-offset trick there.
at::Tensor nms_mlu(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold, double offset,
                   const c10::optional<at::Tensor>& labels) {
  TORCH_CHECK(!(labels.has_value() && labels->defined()), "frcnn_ops MLU nms: labels unsupported (ops.py shifts)");
  TORCH_CHECK(offset == 0, "frcnn_ops MLU nms: offset must be applied by ops.py");
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4 && scores.dim() == 1 && scores.size(0) == boxes.size(0),
              "frcnn_ops MLU nms: boxes (N, 4) and scores (N,), got ", boxes.sizes(), " and ", scores.sizes());
  const float thr = static_cast<float>(iou_threshold);
  TORCH_CHECK(static_cast<double>(thr) == iou_threshold, "frcnn_ops MLU nms: iou_threshold ", iou_threshold,
              " is not a float32 value; ops_mlu.cnnl_iou_threshold makes CNNL's >= rule equal to > t");
  const int64_t n = boxes.size(0);
  if (n == 0) return at::empty({0}, boxes.options().dtype(at::kLong));
  torch_mlu::mlu::MLUGuard guard(boxes.device());
  const at::Tensor b = boxes.to(at::kFloat).contiguous(), s = scores.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({n}, b.options().dtype(at::kInt));
  at::Tensor out_size = at::zeros({1}, b.options().dtype(at::kInt));
  TensorDesc b_desc(b), s_desc(s), out_desc(out);
  const int max_out = static_cast<int>(n), layout = 0;
  const float zero = 0.0f;  // confidence threshold: scores are > 0 (ops_mlu.rank_scores), so none is dropped
  NmsDesc nms_desc;
  auto handle = torch_mlu::getCurrentHandle();
  size_t ws_bytes = 0;
#if CNNL_MAJOR >= 2
  // CNNL 2.0: one setter per attribute; value types as torch_mlu 1.25 passes them.
  const cnnlNmsBoxPointMode_t box_mode = CNNL_NMS_BOX_DIAGONAL;
  const cnnlNmsOutputMode_t out_mode = CNNL_NMS_OUTPUT_TARGET_INDICES;
  const bool pad = false;
  FRCNN_CNNL_CHECK(cnnlSetNmsDescAttr(nms_desc.desc, CNNL_NMS_DESC_BOX_MODE, &box_mode, sizeof(box_mode)));
  FRCNN_CNNL_CHECK(cnnlSetNmsDescAttr(nms_desc.desc, CNNL_NMS_DESC_OUTPUT_MODE, &out_mode, sizeof(out_mode)));
  FRCNN_CNNL_CHECK(cnnlSetNmsDescAttr(nms_desc.desc, CNNL_NMS_DESC_IOU_THRESHOLD, &thr, sizeof(thr)));
  FRCNN_CNNL_CHECK(cnnlSetNmsDescAttr(nms_desc.desc, CNNL_NMS_DESC_MAX_OUTPUT_SIZE, &max_out, sizeof(max_out)));
  FRCNN_CNNL_CHECK(cnnlSetNmsDescAttr(nms_desc.desc, CNNL_NMS_DESC_CONFIDENCE_THRESHOLD, &zero, sizeof(zero)));
  FRCNN_CNNL_CHECK(cnnlSetNmsDescAttr(nms_desc.desc, CNNL_NMS_DESC_OFFSET, &zero, sizeof(zero)));
  FRCNN_CNNL_CHECK(cnnlSetNmsDescAttr(nms_desc.desc, CNNL_NMS_DESC_INPUT_LAYOUT, &layout, sizeof(layout)));
  FRCNN_CNNL_CHECK(cnnlSetNmsDescAttr(nms_desc.desc, CNNL_NMS_DESC_PAD_TO_MAX_OUTPUT_SIZE, &pad, sizeof(pad)));
  FRCNN_CNNL_CHECK(cnnlGetNmsWorkspaceSize_v4(handle, nms_desc.desc, b_desc.desc, s_desc.desc, &ws_bytes));
#else
  // CNNL 1.2x (torch_mlu 1.22): torch_mlu's own settings for torchvision::nms (cnnlOpDescriptors.cpp).
  FRCNN_CNNL_CHECK(cnnlSetNmsDescriptor_v5(nms_desc.desc, CNNL_NMS_BOX_DIAGONAL, CNNL_NMS_OUTPUT_TARGET_INDICES,
                                           CNNL_NMS_ALGO_EXCLUDE_BOUNDARY, CNNL_NMS_HARD_NMS, thr, zero, max_out,
                                           zero, zero, layout, false));
  FRCNN_CNNL_CHECK(cnnlGetNmsWorkspaceSize_v3(handle, b_desc.desc, s_desc.desc, &ws_bytes));
#endif
  at::Tensor ws = at::empty({static_cast<int64_t>(std::max<size_t>(ws_bytes, 1))}, b.options().dtype(at::kByte));
  FRCNN_CNNL_CHECK(cnnlNms_v2(handle, nms_desc.desc, b_desc.desc, b.data_ptr(), s_desc.desc, s.data_ptr(),
                              ws.data_ptr(), ws_bytes, out_desc.desc, out.data_ptr(), out_size.data_ptr()));
  const int kept = out_size.cpu().item<int>();  // deliberate sync: the count decides the output length
  return out.slice(0, 0, kept).to(at::kLong);  // output mode 0: already by decreasing score
}

void check_mlu_roi_args(const at::Tensor& t, const at::Tensor& rois, int64_t sampling_ratio) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && rois.scalar_type() == at::kFloat,
              "frcnn_ops MLU roi_align: float tensors expected (ops.py casts)");
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5, "frcnn_ops MLU roi_align: rois (K, 5), got ", rois.sizes());
  // CNNL documents sampling_ratio 0 for adaptive sampling (mlu_op.h, mluOpRoiAlignForward_v2's example) and no
  // negative value; ops_mlu.py maps torchvision's -1 to 0.
  TORCH_CHECK(sampling_ratio >= 0, "frcnn_ops MLU roi_align: sampling_ratio ", sampling_ratio, " < 0 (ops.py maps "
              "adaptive -1 to 0)");
}

at::Tensor roi_align_forward_mlu(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                                 int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio, bool aligned) {
  check_mlu_roi_args(input, rois, sampling_ratio);
  TORCH_CHECK(input.dim() == 4, "frcnn_ops MLU roi_align: input (N, C, H, W), got ", input.sizes());
  torch_mlu::mlu::MLUGuard guard(input.device());
  const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast), r = rois.contiguous();
  at::Tensor out = zeros_channels_last({rois.size(0), input.size(1), pooled_h, pooled_w}, x.options());
  if (out.numel() == 0 || x.numel() == 0) return out;
  TensorDesc x_desc(x), r_desc(r), out_desc(out);
  RoiAlignDesc desc;
  FRCNN_CNNL_CHECK(cnnlSetRoiAlignDescriptor_v2(desc.desc, int(pooled_h), int(pooled_w), int(sampling_ratio),
                                                float(spatial_scale), /*pool_mode avg=*/1, aligned));
  FRCNN_CNNL_CHECK(cnnlRoiAlign_v2(torch_mlu::getCurrentHandle(), desc.desc, x_desc.desc, x.data_ptr(),
                                   r_desc.desc, r.data_ptr(), out_desc.desc, out.data_ptr(), nullptr, nullptr,
                                   nullptr, nullptr));
  return out;
}

at::Tensor roi_align_backward_mlu(const at::Tensor& grad, const at::Tensor& rois, double spatial_scale,
                                  int64_t pooled_h, int64_t pooled_w, int64_t batch_size, int64_t channels,
                                  int64_t height, int64_t width, int64_t sampling_ratio, bool aligned) {
  check_mlu_roi_args(grad, rois, sampling_ratio);
  torch_mlu::mlu::MLUGuard guard(grad.device());
  const at::Tensor g = grad.contiguous(at::MemoryFormat::ChannelsLast), r = rois.contiguous();
  // Zeroed, as mmcv does; torch_mlu leaves it uninitialised (internal/roi_align_internal.cpp).
  at::Tensor grad_input = zeros_channels_last({batch_size, channels, height, width}, g.options());
  if (g.numel() == 0 || grad_input.numel() == 0) return grad_input;
  TensorDesc g_desc(g), r_desc(r), gi_desc(grad_input);
  // _v2 with NULL argmax and average pooling: the entry point kept in CNNL 2.0 (torch_mlu 1.25 calls it so).
  FRCNN_CNNL_CHECK(cnnlRoiAlignBackward_v2(torch_mlu::getCurrentHandle(), g_desc.desc, g.data_ptr(), r_desc.desc,
                                           r.data_ptr(), nullptr, nullptr, nullptr, nullptr, float(spatial_scale),
                                           int(sampling_ratio), aligned, /*pool_mode avg=*/1, gi_desc.desc,
                                           grad_input.data_ptr()));
  return grad_input;
}

}  // namespace mlu
}  // namespace

TORCH_LIBRARY_IMPL(frcnn_ops, PrivateUse1, m) {
  m.impl("nms", &mlu::nms_mlu);
  m.impl("roi_align_forward", &mlu::roi_align_forward_mlu);
  m.impl("roi_align_backward", &mlu::roi_align_backward_mlu);
}
#endif  // WITH_MLU

// An emulated CNNL and torch_mlu C++ API: the declarations ops_mlu.cpp's WITH_MLU section uses, with the
// signatures of the real ones, and host-side bodies that hold to CNNL's documented contract. fake_torch_mlu.py
// puts this file behind the header names torch_mlu ships (cnnl.h, aten/cnnl/cnnlHandle.h,
// framework/core/MLUStream.h, framework/core/mlu_guard.h); test_mlu.py compiles ops_mlu.cpp against it for both
// API generations (-DFAKE_CNNL_MAJOR=1 and 2) and runs it on the stand-in "mlu" device, whose memory is host memory.
//
// Signatures are those of Cambricon's call sites: CNNL 1.2x as torch_mlu 1.22 calls it
// (torch_mlu/csrc/aten/operators/cnnl/internal/{nms,roi_align}_internal.cpp, aten/cnnl/cnnlOpDescriptors.cpp),
// CNNL 2.0 as torch_mlu 1.25 (r2.4_develop) and mlu-ops' "Update CNNL to v2.0.0" commit call it
// (kernels/nms/nms.cpp, kernels/roi_align/...). No public repository holds cnnl.h itself.
// The contract: mlu-ops' mlu_op.h docs for mluOpNms, mluOpRoiAlignForward_v2 and mluOpRoiAlignBackward_v2, which
// forward to CNNL one to one: NMS drops a box at IoU >= iou_threshold and every box whose score is
// <= confidence_threshold, needs x1 < x2 and y1 < y2, and returns indices by decreasing score (ties: lower index,
// as mlu-ops' CPU reference picks the first maximum); ROIAlign wants NHWC features and [K, 5] float boxes with
// x1, y1 >= 0, x2 > x1, y2 > y1; the backward wants spatial_scale in (0, 1]. A broken contract returns
// CNNL_STATUS_BAD_PARAM here, where hardware gives undefined results. ROIAlign's arithmetic is delegated to the
// CPU kernels (frcnn_ops, torchvision's algorithm, which CNNL's docs cite as reference).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

#ifndef FAKE_CNNL_MAJOR
#define FAKE_CNNL_MAJOR 2
#endif
#define CNNL_MAJOR FAKE_CNNL_MAJOR
#define CNNL_MINOR 0
#define CNNL_PATCHLEVEL 0

// ------------------------------------------------------------------------------------------------- cnnl.h
typedef enum {
  CNNL_STATUS_SUCCESS = 0,
  CNNL_STATUS_NOT_INITIALIZED = 1,
  CNNL_STATUS_ALLOC_FAILED = 2,
  CNNL_STATUS_BAD_PARAM = 3,
  CNNL_STATUS_INTERNAL_ERROR = 4,
  CNNL_STATUS_ARCH_MISMATCH = 5,
  CNNL_STATUS_EXECUTION_FAILED = 6,
  CNNL_STATUS_NOT_SUPPORTED = 7,
} cnnlStatus_t;

typedef enum { CNNL_LAYOUT_NCHW = 0, CNNL_LAYOUT_NHWC = 1, CNNL_LAYOUT_HWCN = 2, CNNL_LAYOUT_NDHWC = 3,
               CNNL_LAYOUT_ARRAY = 4, CNNL_LAYOUT_NLC = 13 } cnnlTensorLayout_t;
typedef enum { CNNL_DTYPE_INVALID = 0, CNNL_DTYPE_HALF = 1, CNNL_DTYPE_FLOAT = 2, CNNL_DTYPE_INT8 = 3,
               CNNL_DTYPE_INT16 = 4, CNNL_DTYPE_INT32 = 6, CNNL_DTYPE_INT64 = 9, CNNL_DTYPE_UINT8 = 7,
               CNNL_DTYPE_BOOL = 8, CNNL_DTYPE_DOUBLE = 14, CNNL_DTYPE_BFLOAT16 = 16 } cnnlDataType_t;
typedef enum { CNNL_NMS_BOX_DIAGONAL = 0, CNNL_NMS_BOX_CENTER = 1 } cnnlNmsBoxPointMode_t;
typedef enum { CNNL_NMS_OUTPUT_TARGET_INDICES = 0, CNNL_NMS_OUTPUT_TARGET_CONFIDENCE_AND_BOXES_1D = 1,
               CNNL_NMS_OUTPUT_TARGET_CONFIDENCE_AND_BOXES_2D = 2, CNNL_NMS_OUTPUT_TARGET_BATCH_AND_CLASS = 3
} cnnlNmsOutputMode_t;
typedef enum { CNNL_NMS_ALGO_EXCLUDE_BOUNDARY = 0, CNNL_NMS_ALGO_INCLUDE_BOUNDARY = 1 } cnnlNmsAlgo_t;
typedef enum { CNNL_NMS_HARD_NMS = 0, CNNL_NMS_SOFT_NMS_LINEAR = 1, CNNL_NMS_SOFT_NMS_GAUSSIAN = 2
} cnnlNmsMethodMode_t;
typedef enum { CNNL_NMS_DESC_BOX_MODE = 0, CNNL_NMS_DESC_OUTPUT_MODE = 1, CNNL_NMS_DESC_IOU_THRESHOLD = 2,
               CNNL_NMS_DESC_MAX_OUTPUT_SIZE = 3, CNNL_NMS_DESC_CONFIDENCE_THRESHOLD = 4, CNNL_NMS_DESC_OFFSET = 5,
               CNNL_NMS_DESC_INPUT_LAYOUT = 6, CNNL_NMS_DESC_PAD_TO_MAX_OUTPUT_SIZE = 7 } cnnlNmsDescAttribute_t;

struct cnnlContext { int unused; };
struct cnnlTensorStruct { cnnlTensorLayout_t layout; cnnlDataType_t dtype; std::vector<int64_t> dims; };
struct cnnlNmsStruct {
  int box_mode = 0, output_mode = 0, algo = 0, method = 0, max_output = 0, layout = 0;
  float iou_threshold = 0, confidence_threshold = 0, offset = 0, sigma = 0;
  bool pad = false;
};
struct cnnlRoiAlignStruct { int pooled_h = 0, pooled_w = 0, sampling_ratio = 0, pool_mode = 1; float scale = 1;
                            bool aligned = false; };
typedef cnnlContext* cnnlHandle_t;
typedef cnnlTensorStruct* cnnlTensorDescriptor_t;
typedef cnnlNmsStruct* cnnlNmsDescriptor_t;
typedef cnnlRoiAlignStruct* cnnlRoiAlignDescriptor_t;

inline const char* cnnlGetErrorString(cnnlStatus_t status) {
  return status == CNNL_STATUS_SUCCESS ? "CNNL_STATUS_SUCCESS"
         : status == CNNL_STATUS_BAD_PARAM ? "CNNL_STATUS_BAD_PARAM (emulated CNNL: an argument breaks the contract)"
                                           : "CNNL_STATUS_NOT_SUPPORTED (emulated CNNL)";
}

inline cnnlStatus_t cnnlCreateTensorDescriptor(cnnlTensorDescriptor_t* desc) {
  *desc = new cnnlTensorStruct();
  return CNNL_STATUS_SUCCESS;
}
inline cnnlStatus_t cnnlDestroyTensorDescriptor(cnnlTensorDescriptor_t desc) {
  delete desc;
  return CNNL_STATUS_SUCCESS;
}
inline cnnlStatus_t cnnlSetTensorDescriptor(cnnlTensorDescriptor_t desc, cnnlTensorLayout_t layout,
                                            cnnlDataType_t dtype, int dimNb, const int dimSize[]) {
  if (dimNb < 0 || dtype == CNNL_DTYPE_INVALID) return CNNL_STATUS_BAD_PARAM;
  desc->layout = layout;
  desc->dtype = dtype;
  desc->dims.assign(dimSize, dimSize + dimNb);
  return CNNL_STATUS_SUCCESS;
}

inline cnnlStatus_t cnnlCreateNmsDescriptor(cnnlNmsDescriptor_t* desc) {
  *desc = new cnnlNmsStruct();
  return CNNL_STATUS_SUCCESS;
}
inline cnnlStatus_t cnnlDestroyNmsDescriptor(cnnlNmsDescriptor_t desc) {
  delete desc;
  return CNNL_STATUS_SUCCESS;
}

#if CNNL_MAJOR >= 2
inline cnnlStatus_t cnnlSetNmsDescAttr(cnnlNmsDescriptor_t desc, cnnlNmsDescAttribute_t attr, const void* value,
                                       size_t size_in_bytes) {
  switch (attr) {
    case CNNL_NMS_DESC_BOX_MODE: std::memcpy(&desc->box_mode, value, std::min(size_in_bytes, sizeof(int))); break;
    case CNNL_NMS_DESC_OUTPUT_MODE: std::memcpy(&desc->output_mode, value, std::min(size_in_bytes, sizeof(int)));
      break;
    case CNNL_NMS_DESC_IOU_THRESHOLD: if (size_in_bytes != sizeof(float)) return CNNL_STATUS_BAD_PARAM;
      std::memcpy(&desc->iou_threshold, value, sizeof(float)); break;
    case CNNL_NMS_DESC_MAX_OUTPUT_SIZE: if (size_in_bytes != sizeof(int)) return CNNL_STATUS_BAD_PARAM;
      std::memcpy(&desc->max_output, value, sizeof(int)); break;
    case CNNL_NMS_DESC_CONFIDENCE_THRESHOLD: if (size_in_bytes != sizeof(float)) return CNNL_STATUS_BAD_PARAM;
      std::memcpy(&desc->confidence_threshold, value, sizeof(float)); break;
    case CNNL_NMS_DESC_OFFSET: if (size_in_bytes != sizeof(float)) return CNNL_STATUS_BAD_PARAM;
      std::memcpy(&desc->offset, value, sizeof(float)); break;
    case CNNL_NMS_DESC_INPUT_LAYOUT: if (size_in_bytes != sizeof(int)) return CNNL_STATUS_BAD_PARAM;
      std::memcpy(&desc->layout, value, sizeof(int)); break;
    case CNNL_NMS_DESC_PAD_TO_MAX_OUTPUT_SIZE: if (size_in_bytes != sizeof(bool)) return CNNL_STATUS_BAD_PARAM;
      std::memcpy(&desc->pad, value, sizeof(bool)); break;
    default: return CNNL_STATUS_BAD_PARAM;
  }
  return CNNL_STATUS_SUCCESS;
}
inline cnnlStatus_t cnnlGetNmsWorkspaceSize_v4(cnnlHandle_t, const cnnlNmsDescriptor_t, const cnnlTensorDescriptor_t,
                                               const cnnlTensorDescriptor_t, size_t* size) {
  *size = 64;
  return CNNL_STATUS_SUCCESS;
}
#else
inline cnnlStatus_t cnnlSetNmsDescriptor_v5(cnnlNmsDescriptor_t desc, const cnnlNmsBoxPointMode_t box_mode,
                                            const cnnlNmsOutputMode_t output_mode, const cnnlNmsAlgo_t algo,
                                            const cnnlNmsMethodMode_t method_mode, const float iou_threshold,
                                            const float soft_nms_sigma, const int max_output_size,
                                            const float confidence_threshold, const float offset,
                                            const int input_layout, const bool pad_to_max_output_size) {
  desc->box_mode = box_mode; desc->output_mode = output_mode; desc->algo = algo; desc->method = method_mode;
  desc->iou_threshold = iou_threshold; desc->sigma = soft_nms_sigma; desc->max_output = max_output_size;
  desc->confidence_threshold = confidence_threshold; desc->offset = offset; desc->layout = input_layout;
  desc->pad = pad_to_max_output_size;
  return CNNL_STATUS_SUCCESS;
}
inline cnnlStatus_t cnnlGetNmsWorkspaceSize_v3(cnnlHandle_t, const cnnlTensorDescriptor_t,
                                               const cnnlTensorDescriptor_t, size_t* size) {
  *size = 64;
  return CNNL_STATUS_SUCCESS;
}
#endif

inline cnnlStatus_t cnnlNms_v2(cnnlHandle_t handle, const cnnlNmsDescriptor_t nms_desc,
                               const cnnlTensorDescriptor_t boxes_desc, const void* boxes,
                               const cnnlTensorDescriptor_t confidence_desc, const void* confidence, void* workspace,
                               size_t workspace_size, const cnnlTensorDescriptor_t output_desc, void* output,
                               void* output_size) {
  const cnnlNmsStruct& d = *nms_desc;
  // Only what torch_mlu and ops_mlu.cpp ask for is emulated: corners, indices, hard NMS, [N, 4], no offset.
  if (!handle || !workspace || workspace_size < 64 || d.box_mode != 0 || d.output_mode != 0 || d.algo != 0 ||
      d.method != 0 || d.layout != 0 || d.offset != 0 || d.confidence_threshold < 0 ||
      d.confidence_threshold > 1)
    return CNNL_STATUS_BAD_PARAM;
  if (boxes_desc->dims.size() != 2 || boxes_desc->dims[1] != 4 || confidence_desc->dims.size() != 1 ||
      confidence_desc->dims[0] != boxes_desc->dims[0] || boxes_desc->dtype != CNNL_DTYPE_FLOAT ||
      confidence_desc->dtype != CNNL_DTYPE_FLOAT || output_desc->dtype != CNNL_DTYPE_INT32)
    return CNNL_STATUS_BAD_PARAM;
  const int64_t n = boxes_desc->dims[0];
  const float* b = static_cast<const float*>(boxes);
  const float* s = static_cast<const float*>(confidence);
  for (int64_t i = 0; i < n; ++i)
    if (!(b[4 * i] < b[4 * i + 2] && b[4 * i + 1] < b[4 * i + 3])) return CNNL_STATUS_BAD_PARAM;
  std::vector<int64_t> order;
  for (int64_t i = 0; i < n; ++i)
    if (s[i] > d.confidence_threshold) order.push_back(i);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t c) { return s[a] > s[c]; });
  std::vector<int64_t> kept;
  for (int64_t j : order) {
    if (static_cast<int>(kept.size()) >= d.max_output) break;
    const float jarea = (b[4 * j + 2] - b[4 * j]) * (b[4 * j + 3] - b[4 * j + 1]);
    bool drop = false;
    for (int64_t k : kept) {
      const float w = std::max(0.f, std::min(b[4 * k + 2], b[4 * j + 2]) - std::max(b[4 * k], b[4 * j]));
      const float h = std::max(0.f, std::min(b[4 * k + 3], b[4 * j + 3]) - std::max(b[4 * k + 1], b[4 * j + 1]));
      const float inter = w * h;
      const float karea = (b[4 * k + 2] - b[4 * k]) * (b[4 * k + 3] - b[4 * k + 1]);
      if (inter / (karea + jarea - inter) >= d.iou_threshold) {  // ">=": the documented rule
        drop = true;
        break;
      }
    }
    if (!drop) kept.push_back(j);
  }
  int* out = static_cast<int*>(output);
  for (size_t i = 0; i < kept.size(); ++i) out[i] = static_cast<int>(kept[i]);
  *static_cast<int*>(output_size) = static_cast<int>(kept.size());
  return CNNL_STATUS_SUCCESS;
}

inline cnnlStatus_t cnnlCreateRoiAlignDescriptor(cnnlRoiAlignDescriptor_t* desc) {
  *desc = new cnnlRoiAlignStruct();
  return CNNL_STATUS_SUCCESS;
}
inline cnnlStatus_t cnnlDestroyRoiAlignDescriptor(cnnlRoiAlignDescriptor_t desc) {
  delete desc;
  return CNNL_STATUS_SUCCESS;
}
inline cnnlStatus_t cnnlSetRoiAlignDescriptor_v2(cnnlRoiAlignDescriptor_t desc, const int pooled_height,
                                                 const int pooled_width, const int sampling_ratio,
                                                 const float spatial_scale, const int pool_mode, const bool aligned) {
  if (pooled_height <= 0 || pooled_width <= 0 || sampling_ratio < 0) return CNNL_STATUS_BAD_PARAM;
  *desc = cnnlRoiAlignStruct{pooled_height, pooled_width, sampling_ratio, pool_mode, spatial_scale, aligned};
  return CNNL_STATUS_SUCCESS;
}

namespace fake_cnnl {
// A host tensor (N, C, H, W) viewing an NHWC buffer that a descriptor describes.
inline at::Tensor nhwc_view(const cnnlTensorStruct& d, const void* data) {
  return at::from_blob(const_cast<void*>(data), {d.dims[0], d.dims[1], d.dims[2], d.dims[3]}, at::kFloat)
      .permute({0, 3, 1, 2});
}
inline bool nhwc_float(const cnnlTensorStruct& d) {
  return d.layout == CNNL_LAYOUT_NHWC && d.dtype == CNNL_DTYPE_FLOAT && d.dims.size() == 4;
}
inline bool boxes_ok(const cnnlTensorStruct& d, const void* boxes) {
  if (d.layout != CNNL_LAYOUT_ARRAY || d.dtype != CNNL_DTYPE_FLOAT || d.dims.size() != 2 || d.dims[1] != 5)
    return false;
  const float* r = static_cast<const float*>(boxes);
  for (int64_t k = 0; k < d.dims[0]; ++k, r += 5)
    if (!(r[1] >= 0 && r[2] >= 0 && r[3] > r[1] && r[4] > r[2])) return false;
  return true;
}
inline at::Tensor rois(const cnnlTensorStruct& d, const void* boxes) {
  return at::from_blob(const_cast<void*>(boxes), {d.dims[0], 5}, at::kFloat);
}
}  // namespace fake_cnnl

inline cnnlStatus_t cnnlRoiAlign_v2(cnnlHandle_t handle, const cnnlRoiAlignDescriptor_t desc,
                                    const cnnlTensorDescriptor_t input_desc, const void* input,
                                    const cnnlTensorDescriptor_t boxes_desc, const void* boxes,
                                    const cnnlTensorDescriptor_t output_desc, void* output,
                                    const cnnlTensorDescriptor_t argmax_x_desc, void* argmax_x,
                                    const cnnlTensorDescriptor_t argmax_y_desc, void* argmax_y) {
  using namespace fake_cnnl;
  if (!handle || desc->pool_mode != 1 || argmax_x || argmax_y || argmax_x_desc || argmax_y_desc ||
      !nhwc_float(*input_desc) || !nhwc_float(*output_desc) || !boxes_ok(*boxes_desc, boxes))
    return CNNL_STATUS_BAD_PARAM;
  const auto& o = output_desc->dims;
  if (o[0] != boxes_desc->dims[0] || o[1] != desc->pooled_h || o[2] != desc->pooled_w ||
      o[3] != input_desc->dims[3])
    return CNNL_STATUS_BAD_PARAM;
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("frcnn_ops::roi_align_forward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double, int64_t, int64_t, int64_t,
                                         bool)>();
  at::Tensor y = op.call(nhwc_view(*input_desc, input).contiguous(), rois(*boxes_desc, boxes), desc->scale,
                         desc->pooled_h, desc->pooled_w, desc->sampling_ratio, desc->aligned);
  nhwc_view(*output_desc, output).copy_(y);
  return CNNL_STATUS_SUCCESS;
}

inline cnnlStatus_t cnnlRoiAlignBackward_v2(cnnlHandle_t handle, const cnnlTensorDescriptor_t grads_desc,
                                            const void* grads, const cnnlTensorDescriptor_t boxes_desc,
                                            const void* boxes, const cnnlTensorDescriptor_t argmax_x_desc,
                                            const void* argmax_x, const cnnlTensorDescriptor_t argmax_y_desc,
                                            const void* argmax_y, const float spatial_scale,
                                            const int sampling_ratio, const bool aligned, const int pool_mode,
                                            const cnnlTensorDescriptor_t grads_image_desc, void* grads_image) {
  using namespace fake_cnnl;
  if (!handle || pool_mode != 1 || argmax_x || argmax_y || argmax_x_desc || argmax_y_desc || sampling_ratio < 0 ||
      !(spatial_scale > 0 && spatial_scale <= 1) || !nhwc_float(*grads_desc) || !nhwc_float(*grads_image_desc) ||
      !boxes_ok(*boxes_desc, boxes) || grads_desc->dims[0] != boxes_desc->dims[0] ||
      grads_desc->dims[3] != grads_image_desc->dims[3])
    return CNNL_STATUS_BAD_PARAM;
  const auto& gi = grads_image_desc->dims;
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("frcnn_ops::roi_align_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double, int64_t, int64_t, int64_t,
                                         int64_t, int64_t, int64_t, int64_t, bool)>();
  at::Tensor g = op.call(nhwc_view(*grads_desc, grads).contiguous(), rois(*boxes_desc, boxes), spatial_scale,
                         grads_desc->dims[1], grads_desc->dims[2], gi[0], gi[3], gi[1], gi[2], sampling_ratio,
                         aligned);
  nhwc_view(*grads_image_desc, grads_image).copy_(g);
  return CNNL_STATUS_SUCCESS;
}

// ------------------------------------------------------------ torch_mlu: aten/cnnl/cnnlHandle.h, mlu_guard.h
namespace torch_mlu {
inline cnnlHandle_t getCurrentHandle(c10::DeviceIndex device_index = -1) {
  static cnnlContext context;
  (void)device_index;
  return &context;
}
namespace mlu {
class MLUGuard {  // framework/core/mlu_guard.h: sets the current device for its scope
 public:
  explicit MLUGuard(c10::Device device) : guard_(device) {}
 private:
  c10::DeviceGuard guard_;
};
}  // namespace mlu
}  // namespace torch_mlu

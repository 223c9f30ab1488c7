/* Decode one region of a JPEG at a DCT scale of M/8 with libjpeg(-turbo): what a random-resized crop needs.
 *
 * libjpeg-turbo (>= 1.5) decodes a region without the work outside it: jpeg_crop_scanline() limits the
 * inverse DCT, upsampling and colour conversion to the columns of the region (widened to whole iMCUs),
 * jpeg_skip_scanlines() skips them for the rows above it, and decoding stops after its last row. The
 * scaled inverse DCT (scale_num/8, M = 1..8) shrinks the image while decoding. Loaded with ctypes by
 * xnorpp/data/decode.py; errors come back as libjpeg's message, never as an exit. */
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>
#include <jerror.h>

struct xnorpp_error {
  struct jpeg_error_mgr pub;
  jmp_buf jump;
  char *msg;
  int msg_len;
};

static void xnorpp_error_exit(j_common_ptr cinfo) {
  struct xnorpp_error *err = (struct xnorpp_error *)cinfo->err;
  char buffer[JMSG_LENGTH_MAX];
  (*cinfo->err->format_message)(cinfo, buffer);
  snprintf(err->msg, (size_t)err->msg_len, "%s", buffer);
  longjmp(err->jump, 1);
}

/* Warnings are ignored, as PIL does (e.g. "extraneous bytes before marker"), except data that ends early,
 * which PIL reports as a truncated file. */
static void xnorpp_emit_message(j_common_ptr cinfo, int msg_level) {
  if (msg_level == -1 && cinfo->err->msg_code == JWRN_JPEG_EOF) xnorpp_error_exit(cinfo);
}

/* Width, height and number of colour components of a JPEG (its header only). Returns 0, or -1 with a message
 * in msg. */
int xnorpp_jpeg_size(const unsigned char *buf, unsigned long len, int *width, int *height, int *components,
                     char *msg, int msg_len) {
  struct jpeg_decompress_struct cinfo;
  struct xnorpp_error err;
  cinfo.err = jpeg_std_error(&err.pub);
  err.pub.error_exit = xnorpp_error_exit;
  err.pub.emit_message = xnorpp_emit_message;
  err.msg = msg;
  err.msg_len = msg_len;
  if (setjmp(err.jump)) {
    jpeg_destroy_decompress(&cinfo);
    return -1;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, buf, len);
  jpeg_read_header(&cinfo, TRUE);
  *width = (int)cinfo.image_width;
  *height = (int)cinfo.image_height;
  *components = cinfo.num_components;
  jpeg_destroy_decompress(&cinfo);
  return 0;
}

/* Decode rows y..y+h-1 and columns x..x+w-1 of the image scaled by scale_num/8 (coordinates in the scaled
 * image, inside it) as RGB into out (h rows of 3*w bytes). Returns 0, or -1 with a message in msg. */
int xnorpp_jpeg_decode_region(const unsigned char *buf, unsigned long len, int scale_num, int x, int y, int w,
                              int h, unsigned char *out, char *msg, int msg_len) {
  struct jpeg_decompress_struct cinfo;
  struct xnorpp_error err;
  unsigned char *volatile line = NULL;
  cinfo.err = jpeg_std_error(&err.pub);
  err.pub.error_exit = xnorpp_error_exit;
  err.pub.emit_message = xnorpp_emit_message;
  err.msg = msg;
  err.msg_len = msg_len;
  if (setjmp(err.jump)) {
    jpeg_destroy_decompress(&cinfo);
    free(line);
    return -1;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, buf, len);
  jpeg_read_header(&cinfo, TRUE);
  cinfo.out_color_space = JCS_RGB;
  cinfo.scale_num = (unsigned int)scale_num;
  cinfo.scale_denom = 8;
  jpeg_start_decompress(&cinfo);
  if (x < 0 || y < 0 || w <= 0 || h <= 0 || (JDIMENSION)(x + w) > cinfo.output_width ||
      (JDIMENSION)(y + h) > cinfo.output_height) {
    snprintf(msg, (size_t)msg_len, "region %dx%d at (%d, %d) is outside the %ux%u image", w, h, x, y,
             cinfo.output_width, cinfo.output_height);
    jpeg_destroy_decompress(&cinfo);
    return -1;
  }
  /* one more column each side where there is one: the upsampling of subsampled chroma treats the region's
   * first and last columns as image edges, so these stay outside the result, which equals the full decode's */
  JDIMENSION xoffset = (JDIMENSION)(x > 0 ? x - 1 : 0);
  JDIMENSION width = (JDIMENSION)(x + w) + ((JDIMENSION)(x + w) < cinfo.output_width) - xoffset;
  if (width < cinfo.output_width) jpeg_crop_scanline(&cinfo, &xoffset, &width);
  line = (unsigned char *)malloc((size_t)width * 3);
  if (line == NULL) {
    snprintf(msg, (size_t)msg_len, "out of memory");
    jpeg_destroy_decompress(&cinfo);
    return -1;
  }
  if (y > 0) jpeg_skip_scanlines(&cinfo, (JDIMENSION)y);
  JSAMPROW row = line;
  size_t shift = (size_t)(x - (int)xoffset) * 3, bytes = (size_t)w * 3;
  for (int r = 0; r < h; r++) {
    if (jpeg_read_scanlines(&cinfo, &row, 1) != 1) {
      snprintf(msg, (size_t)msg_len, "the data ended at row %d of %d", y + r, cinfo.output_height);
      jpeg_destroy_decompress(&cinfo);
      free(line);
      return -1;
    }
    memcpy(out + (size_t)r * bytes, line + shift, bytes);
  }
  jpeg_abort_decompress(&cinfo); /* the rows below the region are never decoded */
  jpeg_destroy_decompress(&cinfo);
  free(line);
  return 0;
}

/* Decode one region of a JPEG with libjpeg-turbo, at a DCT scale: what DALI's
 * `image_random_crop` decoder does on the CPU, for rn50.data.turbo_decode.
 *
 * No Python binding of libjpeg-turbo (simplejpeg, PyTurboJPEG, imagecodecs) exposes partial
 * decoding, so this is the thinnest one that does, on the library's documented API:
 *   - scale_num/scale_denom: the IDCT produces the image at 1/2, 1/4 or 1/8 size directly;
 *   - jpeg_skip_scanlines: rows above the region are entropy-decoded only (no IDCT, no colour);
 *   - jpeg_crop_scanline: only the iMCU columns holding the region are IDCT'd and converted;
 *   - rows below the region are never decoded at all (jpeg_destroy_decompress ends it there).
 * A progressive JPEG's scans are all read before the first row (libjpeg buffers the coefficients);
 * the IDCT and colour work are still only the region's.
 * Corrupt data (errors and libjpeg's corrupt-data warnings alike) raises ValueError, so the
 * caller can hand the file to Pillow, which decides for itself.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <setjmp.h>
#include <stdio.h>
#include <string.h>
#include <jpeglib.h>

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf escape;
    char message[JMSG_LENGTH_MAX];
} region_error_mgr;

static void on_error(j_common_ptr cinfo) {
    region_error_mgr *err = (region_error_mgr *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->escape, 1);
}

/* Warnings (msg_level -1) mean damaged data: treat them as errors, like simplejpeg's strict. */
static void on_message(j_common_ptr cinfo, int msg_level) {
    if (msg_level < 0) on_error(cinfo);
}

static int scaled(int size, int denom) { return (size + denom - 1) / denom; }

PyDoc_STRVAR(decode_region_doc,
"decode_region(data, scale_denom, top, left, height, width, out)\n\n"
"Decode rows [top, top+height) x columns [left, left+width) of the JPEG `data` as RGB at\n"
"1/scale_denom size (coordinates in that scaled image) into the writable buffer `out`, which\n"
"must hold height x scaled width x 3 bytes (the decode's room). Its first height x width x 3\n"
"bytes are then the region, C-contiguous: exactly those pixels of a whole-image decode.\n"
"Raises ValueError on corrupt data, a region outside the image or a too-small buffer.");

/* Decode the region's rows into `out` at the decoded row width, then pack them to `width`.
 * Rows go straight into `out`: decoding into one reused row buffer and copying measured 10%
 * slower. One column of context on each side: fancy chroma upsampling needs the neighbour of an
 * edge column, and a decode cropped at that column would treat it as the image's edge. */
static void read_region(struct jpeg_decompress_struct *cinfo, int top, int left,
                        int height, int width, unsigned char *out) {
    JDIMENSION first = left > 0 ? (JDIMENSION)left - 1 : 0;
    JDIMENSION right = (JDIMENSION)(left + width);  /* one past the region's last column */
    JDIMENSION end = right < cinfo->output_width ? right + 1 : cinfo->output_width;
    JDIMENSION x0 = first, row_px = end - first;
    jpeg_crop_scanline(cinfo, &x0, &row_px);  /* widens to whole iMCU columns */
    if (top > 0) jpeg_skip_scanlines(cinfo, (JDIMENSION)top);
    for (int r = 0; r < height; r++) {
        JSAMPROW row = out + (size_t)r * row_px * 3;
        jpeg_read_scanlines(cinfo, &row, 1);  /* in-memory source: always one row */
    }
    /* In place, first row first: row r's destination ends before row r+1's source begins. */
    for (int r = 0; r < height; r++)
        memmove(out + (size_t)r * width * 3, out + ((size_t)r * row_px + (left - (int)x0)) * 3,
                (size_t)width * 3);
}

static PyObject *decode_region(PyObject *self, PyObject *args) {
    Py_buffer data, out;
    int denom, top, left, height, width;
    if (!PyArg_ParseTuple(args, "y*iiiiiw*", &data, &denom, &top, &left, &height, &width, &out))
        return NULL;
    struct jpeg_decompress_struct cinfo;
    region_error_mgr err;
    const char *volatile problem = NULL;
    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = on_error;
    err.pub.emit_message = on_message;
    err.message[0] = '\0';
    jpeg_create_decompress(&cinfo);
    Py_BEGIN_ALLOW_THREADS
    if (setjmp(err.escape)) {
        problem = err.message;
    } else {
        jpeg_mem_src(&cinfo, (const unsigned char *)data.buf, (unsigned long)data.len);
        jpeg_read_header(&cinfo, TRUE);
        cinfo.out_color_space = JCS_RGB;
        cinfo.dct_method = JDCT_IFAST;
        cinfo.scale_num = 1;
        cinfo.scale_denom = (unsigned int)denom;
        jpeg_start_decompress(&cinfo);
        if (denom < 1 || top < 0 || left < 0 || height < 1 || width < 1 ||
            (JDIMENSION)(top + height) > cinfo.output_height ||
            (JDIMENSION)(left + width) > cinfo.output_width ||
            cinfo.output_width != (JDIMENSION)scaled((int)cinfo.image_width, denom)) {
            problem = "region outside the scaled image, or an unsupported scale";
        } else if ((Py_ssize_t)height * cinfo.output_width * 3 > out.len) {
            problem = "output buffer too small";
        } else {
            read_region(&cinfo, top, left, height, width, (unsigned char *)out.buf);
        }
    }
    jpeg_destroy_decompress(&cinfo);  /* also ends a decode stopped above the last row */
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    PyBuffer_Release(&out);
    if (problem) {
        PyErr_Format(PyExc_ValueError, "JPEG region decode: %s", problem);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"decode_region", decode_region, METH_VARARGS, decode_region_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "rn50_jpeg_region",
    "Partial (region) JPEG decoding with libjpeg-turbo; see decode_region.", -1, methods,
};

PyMODINIT_FUNC PyInit_rn50_jpeg_region(void) { return PyModule_Create(&module); }

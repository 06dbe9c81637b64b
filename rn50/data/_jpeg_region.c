/* Decode one region of a JPEG with libjpeg-turbo, at a DCT scale: what DALI's
 * `image_random_crop` decoder does on the CPU, for rn50.data.turbo_decode.
 *
 * No Python binding of libjpeg-turbo (simplejpeg, PyTurboJPEG, imagecodecs) exposes partial
 * decoding, so this is the thinnest one that does, on the library's documented API:
 *   - scale_num/scale_denom: the IDCT produces the image at 1/2, 1/4 or 1/8 size directly;
 *   - jpeg_skip_scanlines: rows above the region are entropy-decoded only (no IDCT, no colour);
 *   - jpeg_crop_scanline: only the iMCU columns holding the region are IDCT'd and converted;
 *   - rows below the region are never decoded at all (jpeg_abort_decompress).
 * Corrupt data (errors and libjpeg's corrupt-data warnings alike) raises ValueError, so the
 * caller can hand the file to Pillow, which decides for itself.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <setjmp.h>
#include <stdio.h>
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
"decode_region(data, scale_denom, top, left, height, width, out) -> (rows, x0, row_px)\n\n"
"Decode rows [top, top+height) and at least columns [left, left+width) of the JPEG `data` as\n"
"RGB at 1/scale_denom size (coordinates in that scaled image), into the writable buffer `out`\n"
"(at least height * scaled_width * 3 bytes). Returns how many rows were written, the first\n"
"decoded column x0 <= left (iMCU-aligned) and the decoded row width row_px >= left + width - x0;\n"
"row r of the region starts at out[r * row_px * 3]. Raises ValueError on corrupt data.");

static PyObject *decode_region(PyObject *self, PyObject *args) {
    Py_buffer data, out;
    int denom, top, left, height, width;
    if (!PyArg_ParseTuple(args, "y*iiiiiw*", &data, &denom, &top, &left, &height, &width, &out))
        return NULL;
    struct jpeg_decompress_struct cinfo;
    region_error_mgr err;
    JDIMENSION x0 = 0, row_px = 0, rows = 0;
    const char *problem = NULL;
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
            x0 = (JDIMENSION)left;
            row_px = (JDIMENSION)(left + width) - x0;
            jpeg_crop_scanline(&cinfo, &x0, &row_px);  /* widens to whole iMCU columns */
            if (top > 0) jpeg_skip_scanlines(&cinfo, (JDIMENSION)top);
            while (rows < (JDIMENSION)height) {
                JSAMPROW row = (JSAMPROW)out.buf + (size_t)rows * row_px * 3;
                rows += jpeg_read_scanlines(&cinfo, &row, 1);
            }
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
    return Py_BuildValue("(III)", rows, x0, row_px);
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

/* Our own stand-in for the config.h that upstream's configure writes: only what
 * nbd-tester-client.c, cliserv.c, buffer.c and crypto-gnutls.c ask of it, for
 * Linux with glibc (Debian 12). The vendored sources stay byte-identical. */
#define HAVE_GNUTLS 1
#define HAVE_MKSTEMP 1
#define HAVE_FDATASYNC 1
#define NBD_LFS 1
#define PACKAGE_VERSION "3.26-mars-vendored"

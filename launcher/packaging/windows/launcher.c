/* NAME.exe, the Windows launcher that `lalo build SPEC --target windows` writes.

   It runs llama.cpp's own llama-server in router mode (every model of the spec on one
   OpenAI-compatible port, each loaded on first request) with the presets and the RAM table
   that lalo wrote at build time. Two ways to find those files:
   - packed: they follow this program in the same file (see winpack.py for the layout); they are
     unpacked once into %LOCALAPPDATA%\lalo\NAME\<content id>\, each file checked by sha256, into a
     temporary folder renamed into place only when whole, and reused by later starts;
   - installed: no pack is appended, and the files lie beside this program (the NSIS installer).
   llama-server and every model server it starts run in a job object that kills them all when
   this program ends in any way (Ctrl+C, closing the window, being killed).
   Exit codes: 0 stopped by its server, 1 error, 2 usage, 130 stopped by Ctrl+C or a close. */

#define WIN32_LEAN_AND_MEAN
#define UNICODE
#define _UNICODE
#include <winsock2.h>
#include <ws2tcpip.h>
#include <windows.h>
#include <bcrypt.h>
#include <shellapi.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PACK_MAGIC "LALOWIN1"
#define INDEX_MAGIC "LALOIDX1"
#define TRAILER_SIZE 64 /* magic 8, index offset 8, index size 8, content id 32, magic 8 */
#define LAUNCH_FILE "lalo-launch.ini"
#define COMPLETE_FILE ".lalo-complete"
#define MAX_MODELS 256
#define CHUNK (1 << 20)
#define STOP_GRACE_MS 10000
#define READY_TIMEOUT_MS 120000

typedef struct {
    char *path; /* relative, '/' separators */
    uint64_t offset, size;
    unsigned char sha256[32];
} entry_t;

typedef struct {
    char name[128];
    char aliases[512];
    uint64_t need;
} model_t;

typedef struct {
    char name[128];
    char title[256];
    char server[256];
    char presets[256];
    int port;
    uint64_t reserve;
    int n_models;
    model_t models[MAX_MODELS];
    uint64_t fits[MAX_MODELS + 1]; /* fits[k]: RAM for any k models at once (k >= 1) */
} launch_t;

static HANDLE g_job = NULL;
static volatile LONG g_stop = 0; /* 1: Ctrl+C (graceful), 2: close/logoff/shutdown */

/* ---- output -------------------------------------------------------------------------- */

static void say(const char *fmt, ...) {
    char buf[4096];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 2, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if (n > (int)sizeof buf - 3) n = (int)sizeof buf - 3;
    buf[n++] = '\r';
    buf[n++] = '\n';
    DWORD written;
    HANDLE out = GetStdHandle(STD_OUTPUT_HANDLE);
    if (out != NULL && out != INVALID_HANDLE_VALUE) WriteFile(out, buf, (DWORD)n, &written, NULL);
}

static char *utf8(const wchar_t *w) {
    int n = WideCharToMultiByte(CP_UTF8, 0, w, -1, NULL, 0, NULL, NULL);
    char *s = malloc(n > 0 ? n : 1);
    if (n <= 0 || !WideCharToMultiByte(CP_UTF8, 0, w, -1, s, n, NULL, NULL)) s[0] = 0;
    return s;
}

static wchar_t *wide(const char *s) {
    int n = MultiByteToWideChar(CP_UTF8, 0, s, -1, NULL, 0);
    wchar_t *w = malloc(sizeof(wchar_t) * (n > 0 ? n : 1));
    if (n <= 0 || !MultiByteToWideChar(CP_UTF8, 0, s, -1, w, n)) w[0] = 0;
    return w;
}

static char *join(const char *a, const char *b) {
    size_t la = strlen(a), lb = strlen(b);
    char *s = malloc(la + lb + 2);
    memcpy(s, a, la);
    s[la] = '\\';
    memcpy(s + la + 1, b, lb + 1);
    for (char *p = s + la + 1; *p; p++)
        if (*p == '/') *p = '\\';
    return s;
}

static void fail_win(const char *what, const char *path) {
    char msg[512] = "";
    FormatMessageA(FORMAT_MESSAGE_FROM_SYSTEM | FORMAT_MESSAGE_IGNORE_INSERTS, NULL, GetLastError(),
                   0, msg, sizeof msg, NULL);
    size_t n = strlen(msg);
    while (n && (msg[n - 1] == '\r' || msg[n - 1] == '\n' || msg[n - 1] == '.')) msg[--n] = 0;
    say("error: %s %s: %s", what, path, msg[0] ? msg : "unknown error");
}

static const char *mib(uint64_t bytes, char *buf, size_t size) {
    snprintf(buf, size, "%llu MiB", (unsigned long long)((bytes + (1 << 20) - 1) >> 20));
    return buf;
}

/* ---- files --------------------------------------------------------------------------- */

static int make_dirs(const char *path) {
    char *copy = _strdup(path);
    for (char *p = copy + 1; *p; p++) {
        if (*p != '\\') continue;
        if (p[-1] == ':') continue; /* C:\ */
        *p = 0;
        wchar_t *w = wide(copy);
        CreateDirectoryW(w, NULL);
        free(w);
        *p = '\\';
    }
    wchar_t *w = wide(copy);
    BOOL ok = CreateDirectoryW(w, NULL) || GetLastError() == ERROR_ALREADY_EXISTS;
    free(w);
    if (!ok) fail_win("cannot create the folder", copy);
    free(copy);
    return ok ? 0 : -1;
}

static void remove_tree(const char *path) {
    char *pattern = join(path, "*");
    wchar_t *wpattern = wide(pattern);
    WIN32_FIND_DATAW found;
    HANDLE h = FindFirstFileW(wpattern, &found);
    if (h != INVALID_HANDLE_VALUE) {
        do {
            if (!wcscmp(found.cFileName, L".") || !wcscmp(found.cFileName, L"..")) continue;
            char *name = utf8(found.cFileName);
            char *child = join(path, name);
            if (found.dwFileAttributes & FILE_ATTRIBUTE_DIRECTORY) {
                remove_tree(child);
            } else {
                wchar_t *w = wide(child);
                SetFileAttributesW(w, FILE_ATTRIBUTE_NORMAL);
                DeleteFileW(w);
                free(w);
            }
            free(child);
            free(name);
        } while (FindNextFileW(h, &found));
        FindClose(h);
    }
    wchar_t *w = wide(path);
    RemoveDirectoryW(w);
    free(w);
    free(wpattern);
    free(pattern);
}

static int64_t file_size(const char *path) {
    WIN32_FILE_ATTRIBUTE_DATA data;
    wchar_t *w = wide(path);
    BOOL ok = GetFileAttributesExW(w, GetFileExInfoStandard, &data);
    free(w);
    if (!ok || (data.dwFileAttributes & FILE_ATTRIBUTE_DIRECTORY)) return -1;
    return ((int64_t)data.nFileSizeHigh << 32) | data.nFileSizeLow;
}

static char *read_text(const char *path) {
    wchar_t *w = wide(path);
    HANDLE f = CreateFileW(w, GENERIC_READ, FILE_SHARE_READ, NULL, OPEN_EXISTING, 0, NULL);
    free(w);
    if (f == INVALID_HANDLE_VALUE) return NULL;
    LARGE_INTEGER size;
    char *text = NULL;
    DWORD got = 0;
    if (GetFileSizeEx(f, &size) && size.QuadPart < (64 << 20)) {
        text = malloc((size_t)size.QuadPart + 1);
        if (!ReadFile(f, text, (DWORD)size.QuadPart, &got, NULL)) got = 0;
        text[got] = 0;
    }
    CloseHandle(f);
    return text;
}

static int read_at(HANDLE f, uint64_t offset, void *buf, DWORD size) {
    LARGE_INTEGER at;
    at.QuadPart = (LONGLONG)offset;
    DWORD got = 0;
    if (!SetFilePointerEx(f, at, NULL, FILE_BEGIN)) return -1;
    if (!ReadFile(f, buf, size, &got, NULL) || got != size) return -1;
    return 0;
}

static uint64_t u64le(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

/* ---- sha256 (Windows CNG) ------------------------------------------------------------- */

typedef struct {
    BCRYPT_ALG_HANDLE alg;
    BCRYPT_HASH_HANDLE hash;
} sha_t;

static int sha_begin(sha_t *s) {
    if (BCryptOpenAlgorithmProvider(&s->alg, BCRYPT_SHA256_ALGORITHM, NULL, 0) < 0) return -1;
    if (BCryptCreateHash(s->alg, &s->hash, NULL, 0, NULL, 0, 0) < 0) return -1;
    return 0;
}

static void sha_update(sha_t *s, const void *data, ULONG n) {
    BCryptHashData(s->hash, (PUCHAR)data, n, 0);
}

static void sha_end(sha_t *s, unsigned char out[32]) {
    BCryptFinishHash(s->hash, out, 32, 0);
    BCryptDestroyHash(s->hash);
    BCryptCloseAlgorithmProvider(s->alg, 0);
}

/* ---- the pack appended to this program ------------------------------------------------ */

typedef struct {
    int count;
    entry_t *entries;
    char id[17]; /* the first 16 hex digits of the content id */
} pack_t;

/* 1: a pack was read; 0: no pack (an installed copy); -1: a damaged pack (said why). */
static int read_pack(HANDLE self, pack_t *pack) {
    LARGE_INTEGER size;
    unsigned char trailer[TRAILER_SIZE];
    if (!GetFileSizeEx(self, &size) || size.QuadPart < TRAILER_SIZE) return 0;
    if (read_at(self, (uint64_t)size.QuadPart - TRAILER_SIZE, trailer, TRAILER_SIZE)) return 0;
    if (memcmp(trailer, PACK_MAGIC, 8) || memcmp(trailer + 56, PACK_MAGIC, 8)) return 0;
    uint64_t at = u64le(trailer + 8), n = u64le(trailer + 16);
    if (n < 12 || n > (64u << 20) || at + n > (uint64_t)size.QuadPart - TRAILER_SIZE) {
        say("error: this program's packed files are damaged (bad index); download it again");
        return -1;
    }
    unsigned char *index = malloc((size_t)n), digest[32];
    sha_t sha;
    if (read_at(self, at, index, (DWORD)n) || sha_begin(&sha)) {
        say("error: cannot read this program's packed files");
        return -1;
    }
    sha_update(&sha, index, (ULONG)n);
    sha_end(&sha, digest);
    if (memcmp(digest, trailer + 24, 32) || memcmp(index, INDEX_MAGIC, 8)) {
        say("error: this program's packed files are damaged (index checksum); download it again");
        return -1;
    }
    for (int i = 0; i < 8; i++) snprintf(pack->id + 2 * i, 3, "%02x", digest[i]);
    uint32_t count = index[8] | index[9] << 8 | index[10] << 16 | (uint32_t)index[11] << 24;
    if (count > n / 50) { /* each entry takes at least 50 bytes */
        say("error: this program's packed files are damaged (bad count); download it again");
        free(index);
        return -1;
    }
    pack->count = (int)count;
    pack->entries = calloc((size_t)pack->count + 1, sizeof(entry_t));
    size_t pos = 12;
    for (int i = 0; i < pack->count; i++) {
        if (pos + 2 > n) goto damaged;
        size_t len = index[pos] | index[pos + 1] << 8;
        pos += 2;
        if (pos + len + 48 > n) goto damaged;
        entry_t *e = &pack->entries[i];
        e->path = malloc(len + 1);
        memcpy(e->path, index + pos, len);
        e->path[len] = 0;
        pos += len;
        e->offset = u64le(index + pos);
        e->size = u64le(index + pos + 8);
        memcpy(e->sha256, index + pos + 16, 32);
        pos += 48;
        /* never write outside the folder: no absolute paths, drive letters or `..` */
        if (!len || e->path[0] == '/' || e->path[0] == '\\' || strchr(e->path, ':') ||
            strstr(e->path, "..") || e->offset + e->size > at)
            goto damaged;
    }
    free(index);
    return 1;
damaged:
    say("error: this program's packed files are damaged (bad entry); download it again");
    free(index);
    return -1;
}

static int unpack_one(HANDLE self, const entry_t *e, const char *root, unsigned char *buf) {
    char *path = join(root, e->path);
    char *slash = strrchr(path, '\\');
    *slash = 0;
    int rc = make_dirs(path);
    *slash = '\\';
    wchar_t *w = wide(path);
    HANDLE out = rc ? INVALID_HANDLE_VALUE
                    : CreateFileW(w, GENERIC_WRITE, 0, NULL, CREATE_ALWAYS, FILE_ATTRIBUTE_NORMAL, NULL);
    free(w);
    if (out == INVALID_HANDLE_VALUE) {
        if (!rc) fail_win("cannot write", path);
        free(path);
        return -1;
    }
    sha_t sha;
    unsigned char digest[32];
    sha_begin(&sha);
    uint64_t done = 0;
    while (done < e->size && rc == 0) {
        DWORD n = (DWORD)(e->size - done < CHUNK ? e->size - done : CHUNK), put = 0;
        if (read_at(self, e->offset + done, buf, n)) {
            say("error: cannot read %s from this program (is it whole?)", e->path);
            rc = -1;
        } else if (!WriteFile(out, buf, n, &put, NULL) || put != n) {
            fail_win("cannot write (is the disk full?)", path);
            rc = -1;
        } else {
            sha_update(&sha, buf, n);
            done += n;
        }
    }
    sha_end(&sha, digest);
    CloseHandle(out);
    if (rc == 0 && memcmp(digest, e->sha256, 32)) {
        say("error: %s does not match its checksum: this program is damaged; download it again",
            e->path);
        rc = -1;
    }
    free(path);
    return rc;
}

static int whole(const pack_t *pack, const char *root) {
    char *marker = join(root, COMPLETE_FILE);
    int ok = file_size(marker) >= 0;
    free(marker);
    for (int i = 0; ok && i < pack->count; i++) {
        char *path = join(root, pack->entries[i].path);
        ok = file_size(path) == (int64_t)pack->entries[i].size;
        free(path);
    }
    return ok;
}

/* ".partial-PID" left by an unpack whose process is gone (killed, a power cut). */
static int abandoned_partial(const char *suffix) {
    if (strncmp(suffix, ".partial-", 9)) return 0;
    DWORD pid = strtoul(suffix + 9, NULL, 10);
    if (pid == GetCurrentProcessId()) return 0;
    HANDLE other = OpenProcess(SYNCHRONIZE, FALSE, pid);
    if (other == NULL) return 1;
    int gone = WaitForSingleObject(other, 0) == WAIT_OBJECT_0;
    CloseHandle(other);
    return gone;
}

/* Other unpacked versions of this program: removed when nothing uses them (a running copy
   holds its files open, so Windows refuses and they stay); and abandoned partial unpacks. */
static void prune_others(const char *base, const char *keep) {
    char *pattern = join(base, "*");
    wchar_t *w = wide(pattern);
    WIN32_FIND_DATAW found;
    HANDLE h = FindFirstFileW(w, &found);
    if (h != INVALID_HANDLE_VALUE) {
        do {
            char *name = utf8(found.cFileName);
            if ((found.dwFileAttributes & FILE_ATTRIBUTE_DIRECTORY) && strspn(name, "0123456789abcdef") == 16 &&
                ((strlen(name) == 16 && strcmp(name, keep)) || abandoned_partial(name + 16))) {
                char *old = join(base, name);
                char *server = join(old, "bin\\llama-server.exe");
                wchar_t *ws = wide(server);
                /* a file in use cannot be opened for delete: then the copy is left alone */
                HANDLE probe = CreateFileW(ws, DELETE, 0, NULL, OPEN_EXISTING, 0, NULL);
                DWORD why = GetLastError();
                if (probe != INVALID_HANDLE_VALUE || why == ERROR_FILE_NOT_FOUND ||
                    why == ERROR_PATH_NOT_FOUND) {
                    if (probe != INVALID_HANDLE_VALUE) CloseHandle(probe);
                    remove_tree(old);
                }
                free(ws);
                free(server);
                free(old);
            }
            free(name);
        } while (FindNextFileW(h, &found));
        FindClose(h);
    }
    free(w);
    free(pattern);
}

/* The folder holding this program's files, unpacked here if needed; NULL after an error. */
static char *unpacked_root(HANDLE self, const pack_t *pack, const char *base) {
    char *root = join(base, pack->id);
    if (whole(pack, root)) {
        prune_others(base, pack->id);
        return root;
    }
    char partial_name[64];
    snprintf(partial_name, sizeof partial_name, "%s.partial-%lu", pack->id, GetCurrentProcessId());
    char *partial = join(base, partial_name);
    remove_tree(partial);
    uint64_t total = 0;
    for (int i = 0; i < pack->count; i++) total += pack->entries[i].size;
    char size_text[32];
    say("unpacking %d files (%s) into %s (once)", pack->count, mib(total, size_text, sizeof size_text),
        root);
    unsigned char *buf = malloc(CHUNK);
    int rc = make_dirs(partial);
    for (int i = 0; rc == 0 && i < pack->count; i++) rc = unpack_one(self, &pack->entries[i], partial, buf);
    free(buf);
    if (rc == 0) {
        char *marker = join(partial, COMPLETE_FILE);
        wchar_t *w = wide(marker);
        HANDLE f = CreateFileW(w, GENERIC_WRITE, 0, NULL, CREATE_ALWAYS, 0, NULL);
        if (f == INVALID_HANDLE_VALUE) rc = -1; else CloseHandle(f);
        free(w);
        free(marker);
    }
    if (rc == 0) {
        remove_tree(root); /* a damaged or partial earlier copy */
        wchar_t *wfrom = wide(partial), *wto = wide(root);
        if (!MoveFileExW(wfrom, wto, 0) && !whole(pack, root)) {
            fail_win("cannot move the unpacked files to", root);
            rc = -1;
        }
        free(wfrom);
        free(wto);
    }
    remove_tree(partial); /* gone after a move; what a failure left otherwise */
    free(partial);
    if (rc) {
        free(root);
        return NULL;
    }
    prune_others(base, pack->id);
    return root;
}

/* ---- lalo-launch.ini: what lalo decided at build time ---------------------------------- */

/* Parses (and consumes) `text`, the contents of lalo-launch.ini read from `where`. */
static int parse_launch(char *text, const char *where, launch_t *cfg) {
    if (text == NULL) {
        say("error: %s is missing: this program's files are incomplete", where);
        return -1;
    }
    memset(cfg, 0, sizeof *cfg);
    cfg->port = 8080;
    for (char *line = strtok(text, "\r\n"); line; line = strtok(NULL, "\r\n")) {
        char *eq = strchr(line, '=');
        if (line[0] == '#' || eq == NULL) continue;
        *eq = 0;
        const char *key = line, *value = eq + 1;
        if (!strcmp(key, "name")) snprintf(cfg->name, sizeof cfg->name, "%s", value);
        else if (!strcmp(key, "title")) snprintf(cfg->title, sizeof cfg->title, "%s", value);
        else if (!strcmp(key, "server")) snprintf(cfg->server, sizeof cfg->server, "%s", value);
        else if (!strcmp(key, "presets")) snprintf(cfg->presets, sizeof cfg->presets, "%s", value);
        else if (!strcmp(key, "port")) cfg->port = atoi(value);
        else if (!strcmp(key, "reserve")) cfg->reserve = _strtoui64(value, NULL, 10);
        else if (!strcmp(key, "model") && cfg->n_models < MAX_MODELS) {
            /* model=NAME NEED_BYTES ALIAS,ALIAS */
            model_t *m = &cfg->models[cfg->n_models++];
            sscanf(value, "%127s %llu %511s", m->name, (unsigned long long *)&m->need, m->aliases);
        } else if (!strcmp(key, "fits")) {
            /* fits=K BYTES: RAM that any K of the models need at once, the reserve included */
            int k = 0;
            unsigned long long need = 0;
            if (sscanf(value, "%d %llu", &k, &need) == 2 && k >= 1 && k <= MAX_MODELS) cfg->fits[k] = need;
        }
    }
    free(text);
    int ok = cfg->name[0] && cfg->server[0] && cfg->presets[0] && cfg->n_models > 0 && cfg->fits[1];
    if (!ok) say("error: %s is incomplete", where);
    return ok ? 0 : -1;
}

/* ---- the command line ------------------------------------------------------------------ */

typedef struct {
    int port;
    char host[256];
    char api_key[512];
    int n_extra;
    char **extra; /* after `--`: passed to llama-server */
} options_t;

static void usage(const char *name) {
    say("usage: %s.exe [--port N] [--host ADDRESS] [--api-key KEY] [-- LLAMA-SERVER OPTIONS]", name);
    say("  Serves every model of %s on one OpenAI-compatible port (http://HOST:PORT/v1),", name);
    say("  each loaded on its first request, as many at once as this machine's RAM holds.");
    say("  --host    the address to listen on (default 127.0.0.1); any other than loopback");
    say("            needs --api-key, which every request must then send as a Bearer token");
    say("  --port    the port (default: the one the package was built with)");
    say("  Ctrl+C or closing the window stops it and every model server.");
}

static int parse_options(int argc, char **argv, const launch_t *cfg, options_t *opt) {
    memset(opt, 0, sizeof *opt);
    opt->port = cfg->port;
    snprintf(opt->host, sizeof opt->host, "127.0.0.1");
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *value = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h") || !strcmp(a, "/?")) {
            usage(cfg->name);
            return 1;
        } else if (!strcmp(a, "--")) {
            opt->extra = argv + i + 1;
            opt->n_extra = argc - i - 1;
            break;
        } else if (!strcmp(a, "--port") && value) {
            char *end;
            long port = strtol(value, &end, 10);
            if (*end || port < 1 || port > 65535) {
                say("error: --port must be a number from 1 to 65535, got %s", value);
                return 2;
            }
            opt->port = (int)port;
            i++;
        } else if (!strcmp(a, "--host") && value) {
            snprintf(opt->host, sizeof opt->host, "%s", value);
            i++;
        } else if (!strcmp(a, "--api-key") && value) {
            snprintf(opt->api_key, sizeof opt->api_key, "%s", value);
            i++;
        } else {
            say("error: unknown option %s (or it needs a value); %s.exe --help lists them", a, cfg->name);
            return 2;
        }
    }
    int loopback = !strcmp(opt->host, "localhost") || !strcmp(opt->host, "::1") ||
                   !strncmp(opt->host, "127.", 4);
    if (!loopback && !opt->api_key[0]) {
        say("error: --host %s would serve the models to other machines without a key: "
            "add --api-key KEY (clients then send `Authorization: Bearer KEY`)", opt->host);
        return 2;
    }
    return 0;
}

/* ---- starting llama-server ------------------------------------------------------------- */

/* One argument quoted the way CommandLineToArgvW and the C runtime read it back. */
static void append_arg(char *cmd, size_t size, const char *arg) {
    size_t n = strlen(cmd);
    if (n && n + 1 < size) cmd[n++] = ' ';
    int quote = !arg[0] || strpbrk(arg, " \t\"") != NULL;
    if (quote && n + 1 < size) cmd[n++] = '"';
    for (const char *p = arg;; p++) {
        size_t slashes = 0;
        while (*p == '\\') { p++; slashes++; }
        if (!*p) { /* double the backslashes before the closing quote */
            for (size_t i = 0; i < (quote ? 2 : 1) * slashes && n + 1 < size; i++) cmd[n++] = '\\';
            break;
        }
        if (*p == '"') {
            for (size_t i = 0; i < 2 * slashes + 1 && n + 1 < size; i++) cmd[n++] = '\\';
        } else {
            for (size_t i = 0; i < slashes && n + 1 < size; i++) cmd[n++] = '\\';
        }
        if (n + 1 < size) cmd[n++] = *p;
    }
    if (quote && n + 1 < size) cmd[n++] = '"';
    cmd[n] = 0;
}

static BOOL WINAPI on_console_event(DWORD event) {
    if (event == CTRL_C_EVENT || event == CTRL_BREAK_EVENT) {
        /* llama-server got it too (same console) and shuts its models down; the main loop
           waits STOP_GRACE_MS for that, then ends the job */
        InterlockedExchange(&g_stop, 1);
        return TRUE;
    }
    /* closing the window, logoff, shutdown: Windows ends this process in seconds */
    InterlockedExchange(&g_stop, 2);
    if (g_job) TerminateJobObject(g_job, 130);
    return TRUE;
}

static HANDLE make_job(void) {
    HANDLE job = CreateJobObjectW(NULL, NULL);
    if (job == NULL) return NULL;
    JOBOBJECT_EXTENDED_LIMIT_INFORMATION info;
    memset(&info, 0, sizeof info);
    info.BasicLimitInformation.LimitFlags = JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE;
    if (!SetInformationJobObject(job, JobObjectExtendedLimitInformation, &info, sizeof info)) {
        CloseHandle(job);
        return NULL;
    }
    return job;
}

static HANDLE open_log(const char *path) {
    SECURITY_ATTRIBUTES inherit = {sizeof inherit, NULL, TRUE};
    wchar_t *w = wide(path);
    size_t n = wcslen(w);
    wchar_t *previous = malloc(sizeof(wchar_t) * (n + 8));
    memcpy(previous, w, sizeof(wchar_t) * (n - 4));
    wcscpy(previous + n - 4, L".prev.log"); /* keep the last run's log */
    MoveFileExW(w, previous, MOVEFILE_REPLACE_EXISTING);
    HANDLE log = CreateFileW(w, FILE_APPEND_DATA, FILE_SHARE_READ | FILE_SHARE_WRITE | FILE_SHARE_DELETE,
                             &inherit, CREATE_ALWAYS, FILE_ATTRIBUTE_NORMAL, NULL);
    free(previous);
    free(w);
    return log;
}

static void show_log_tail(const char *path) {
    char *text = read_text(path);
    if (text == NULL) return;
    size_t n = strlen(text);
    const char *from = n > 1500 ? text + n - 1500 : text;
    say("last lines of %s:\n%s", path, from);
    free(text);
}

static int port_answers(const char *host, int port) {
    char service[16];
    snprintf(service, sizeof service, "%d", port);
    const char *target = !strcmp(host, "0.0.0.0") ? "127.0.0.1" : !strcmp(host, "::") ? "::1" : host;
    struct addrinfo hints, *found = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(target, service, &hints, &found) || found == NULL) return 0;
    SOCKET s = socket(found->ai_family, SOCK_STREAM, IPPROTO_TCP);
    int ok = s != INVALID_SOCKET && connect(s, found->ai_addr, (int)found->ai_addrlen) == 0;
    if (s != INVALID_SOCKET) closesocket(s);
    freeaddrinfo(found);
    return ok;
}

/* 0 when HOST:PORT can be bound now; otherwise says why (another program has it) */
static int port_taken(const char *host, int port) {
    char service[16];
    snprintf(service, sizeof service, "%d", port);
    struct addrinfo hints, *found = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE;
    if (getaddrinfo(host, service, &hints, &found) || found == NULL) {
        say("error: cannot use the address %s: no such host or address", host);
        return 1;
    }
    SOCKET s = socket(found->ai_family, SOCK_STREAM, IPPROTO_TCP);
    BOOL exclusive = TRUE; /* as a server binds: fail if anyone else has the port */
    if (s != INVALID_SOCKET)
        setsockopt(s, SOL_SOCKET, SO_EXCLUSIVEADDRUSE, (const char *)&exclusive, sizeof exclusive);
    int taken = s == INVALID_SOCKET || bind(s, found->ai_addr, (int)found->ai_addrlen) != 0;
    int why = WSAGetLastError();
    if (s != INVALID_SOCKET) closesocket(s);
    freeaddrinfo(found);
    if (taken)
        say("error: cannot listen on %s:%d (%s): choose another port with --port N", host, port,
            why == WSAEADDRINUSE || why == WSAEACCES ? "another program is using it"
                                                      : "the address is not on this machine");
    return taken;
}

static int models_max(const launch_t *cfg, uint64_t available) {
    int k = 0;
    while (k < cfg->n_models && cfg->fits[k + 1] && cfg->fits[k + 1] <= available) k++;
    return k;
}

static void announce(const launch_t *cfg, const options_t *opt, const char *root, const char *log,
                     int k, uint64_t available) {
    char url[320], a[32], b[32];
    int v6 = strchr(opt->host, ':') != NULL;
    snprintf(url, sizeof url, v6 ? "http://[%s]:%d" : "http://%s:%d", opt->host, opt->port);
    say("%s: serving on %s/v1 (OpenAI-compatible API; llama.cpp's web UI at %s/)",
        cfg->title[0] ? cfg->title : cfg->name, url, url);
    for (int i = 0; i < cfg->n_models; i++) {
        const model_t *m = &cfg->models[i];
        int aliased = m->aliases[0] && strcmp(m->aliases, "-");
        say("  model %s%s%s%s: about %s when loaded", m->name, aliased ? " (also " : "",
            aliased ? m->aliases : "", aliased ? ")" : "", mib(m->need, a, sizeof a));
    }
    say("  each loads on its first request; at most %d at once (%s of RAM available now)", k,
        mib(available, b, sizeof b));
    say("  files: %s", root);
    say("  log: %s", log);
    say("  Ctrl+C or closing this window stops every model server.");
}

static int serve(const launch_t *cfg, const options_t *opt, const char *root, const char *base) {
    MEMORYSTATUSEX ram;
    ram.dwLength = sizeof ram;
    GlobalMemoryStatusEx(&ram);
    uint64_t available = ram.ullAvailPhys;
    int k = models_max(cfg, available);
    if (k == 0) {
        const model_t *largest = &cfg->models[0];
        for (int i = 1; i < cfg->n_models; i++)
            if (cfg->models[i].need > largest->need) largest = &cfg->models[i];
        char a[32], b[32];
        say("warning: this machine has %s of RAM available; %s needs %s with lalo's reserve, so it "
            "may fail to load (close other programs or use a machine with more RAM)",
            mib(available, a, sizeof a), largest->name, mib(cfg->fits[1], b, sizeof b));
        k = 1;
    }
    WSADATA wsa;
    WSAStartup(MAKEWORD(2, 2), &wsa);
    if (port_taken(opt->host, opt->port)) return 1;
    char *logs = join(base, "logs");
    char *log_path = join(logs, "server.log");
    if (make_dirs(logs)) return 1;
    HANDLE log = open_log(log_path);
    if (log == INVALID_HANDLE_VALUE) {
        fail_win("cannot write the log", log_path);
        return 1;
    }
    char *server = join(root, cfg->server);
    char *presets = join(root, cfg->presets);
    static char cmd[32768];
    char number[32];
    cmd[0] = 0;
    append_arg(cmd, sizeof cmd, server);
    append_arg(cmd, sizeof cmd, "--models-preset");
    append_arg(cmd, sizeof cmd, presets);
    append_arg(cmd, sizeof cmd, "--models-max");
    snprintf(number, sizeof number, "%d", k);
    append_arg(cmd, sizeof cmd, number);
    append_arg(cmd, sizeof cmd, "--host");
    append_arg(cmd, sizeof cmd, opt->host);
    append_arg(cmd, sizeof cmd, "--port");
    snprintf(number, sizeof number, "%d", opt->port);
    append_arg(cmd, sizeof cmd, number);
    if (opt->api_key[0]) {
        append_arg(cmd, sizeof cmd, "--api-key");
        append_arg(cmd, sizeof cmd, opt->api_key);
    }
    for (int i = 0; i < opt->n_extra; i++) append_arg(cmd, sizeof cmd, opt->extra[i]);

    g_job = make_job();
    if (g_job == NULL) say("warning: no job object (%lu): model servers may outlive this program",
                           GetLastError());
    SetConsoleCtrlHandler(on_console_event, TRUE);
    STARTUPINFOW si;
    PROCESS_INFORMATION pi;
    memset(&si, 0, sizeof si);
    si.cb = sizeof si;
    si.dwFlags = STARTF_USESTDHANDLES;
    si.hStdInput = GetStdHandle(STD_INPUT_HANDLE);
    si.hStdOutput = log;
    si.hStdError = log;
    wchar_t *wcmd = wide(cmd), *wroot = wide(root);
    /* suspended until it is in the job, so nothing it starts can escape the job */
    if (!CreateProcessW(NULL, wcmd, NULL, NULL, TRUE, CREATE_SUSPENDED, NULL, wroot, &si, &pi)) {
        fail_win("cannot start", server);
        return 1;
    }
    if (g_job && !AssignProcessToJobObject(g_job, pi.hProcess))
        say("warning: cannot put llama-server in a job object (%lu): model servers may outlive "
            "this program", GetLastError());
    ResumeThread(pi.hThread);
    CloseHandle(pi.hThread);
    CloseHandle(log);

    DWORD started = GetTickCount(), stop_at = 0;
    int ready = 0;
    for (;;) {
        if (WaitForSingleObject(pi.hProcess, 200) == WAIT_OBJECT_0) break;
        LONG stop = g_stop;
        if (stop && !stop_at) stop_at = GetTickCount();
        if (stop && (stop == 2 || GetTickCount() - stop_at > STOP_GRACE_MS)) {
            if (g_job) TerminateJobObject(g_job, 130);
            else TerminateProcess(pi.hProcess, 130);
        }
        if (!ready && !stop) {
            ready = port_answers(opt->host, opt->port);
            if (ready) announce(cfg, opt, root, log_path, k, available);
            else if (GetTickCount() - started > READY_TIMEOUT_MS) {
                say("error: llama-server did not open port %d within %d s", opt->port,
                    READY_TIMEOUT_MS / 1000);
                show_log_tail(log_path);
                if (g_job) TerminateJobObject(g_job, 1);
                else TerminateProcess(pi.hProcess, 1);
                return 1;
            }
        }
    }
    DWORD code = 1;
    GetExitCodeProcess(pi.hProcess, &code);
    if (g_job) TerminateJobObject(g_job, 0); /* model servers it may have left */
    if (g_stop) {
        say("%s: stopped", cfg->name);
        return 130;
    }
    say("error: llama-server exited with code %lu", code);
    show_log_tail(log_path);
    return code == 0 ? 0 : 1;
}

/* ---- main ------------------------------------------------------------------------------- */

int main(void) {
    SetConsoleOutputCP(CP_UTF8);
    int argc = 0;
    wchar_t **wargv = CommandLineToArgvW(GetCommandLineW(), &argc);
    char **argv = malloc(sizeof(char *) * (argc + 1));
    for (int i = 0; i < argc; i++) argv[i] = utf8(wargv[i]);
    argv[argc] = NULL;

    wchar_t self_path[32768];
    DWORD len = GetModuleFileNameW(NULL, self_path, 32768);
    if (len == 0 || len >= 32768) {
        say("error: cannot find this program's own path");
        return 1;
    }
    char *self = utf8(self_path);
    char *here = _strdup(self);
    *strrchr(here, '\\') = 0;

    HANDLE file = CreateFileW(self_path, GENERIC_READ, FILE_SHARE_READ | FILE_SHARE_DELETE, NULL,
                              OPEN_EXISTING, 0, NULL);
    if (file == INVALID_HANDLE_VALUE) {
        fail_win("cannot read", self);
        return 1;
    }
    pack_t pack;
    memset(&pack, 0, sizeof pack);
    int packed = read_pack(file, &pack);
    if (packed < 0) return 1;
    char *root = here, *base = here;
    launch_t *cfg = calloc(1, sizeof(launch_t));
    char *text = NULL;
    if (packed) {
        /* read straight from the pack: the options are checked, and the folder named, before
           anything is unpacked */
        const entry_t *launch = NULL;
        for (int i = 0; i < pack.count; i++)
            if (!strcmp(pack.entries[i].path, LAUNCH_FILE)) launch = &pack.entries[i];
        if (launch != NULL && launch->size < (1 << 20)) {
            text = calloc(1, (size_t)launch->size + 1);
            if (read_at(file, launch->offset, text, (DWORD)launch->size)) text[0] = 0;
        }
    } else {
        char *path = join(here, LAUNCH_FILE);
        text = read_text(path);
        free(path);
    }
    if (parse_launch(text, LAUNCH_FILE, cfg)) return 1;
    options_t opt;
    int rc = parse_options(argc, argv, cfg, &opt);
    if (rc) return rc == 1 ? 0 : rc;
    if (packed) {
        wchar_t local[MAX_PATH];
        DWORD n = GetEnvironmentVariableW(L"LOCALAPPDATA", local, MAX_PATH);
        if (n == 0 || n >= MAX_PATH) {
            say("error: LOCALAPPDATA is not set: cannot choose where to unpack");
            return 1;
        }
        char *app = utf8(local), *lalo = join(app, "lalo");
        base = join(lalo, cfg->name);
        if (make_dirs(base)) return 1;
        root = unpacked_root(file, &pack, base);
        if (root == NULL) return 1;
    }
    CloseHandle(file);
    return serve(cfg, &opt, root, base);
}

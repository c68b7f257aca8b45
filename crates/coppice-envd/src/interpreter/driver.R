# Coppice code-interpreter driver: one persistent R context.
#
# The agent (coppice-envd) starts this file with Rscript and a unix stream socket on the fd
# named by $COPPICE_DRIVER_FD. R cannot use a socket by its number, so two `cat` helpers
# carry the bytes (an R pipe() connection each way). A request is one line of
# space-separated byte lengths followed by that many fields: the cell number, the code,
# then the per-call env vars as name and value pairs. Events go back as JSON lines: ready,
# result, error, done. User output is not framed: fds 1 and 2 are pipes the agent reads;
# they are flushed before `done`. Cells run in the global environment, one top-level
# expression at a time: every visible value is a result (as IRkernel shows them), and the
# first error stops the cell. See docs/code-interpreter.md.
local({
  fd <- Sys.getenv("COPPICE_DRIVER_FD")
  Sys.unsetenv("COPPICE_DRIVER_FD")
  requests <- pipe(sprintf("exec cat <&%s", fd), open = "rb")
  events <- pipe(sprintf("exec cat >&%s", fd), open = "w")

  json <- function(s) {
    s <- enc2utf8(as.character(s))
    s <- gsub("\\", "\\\\", s, fixed = TRUE)
    s <- gsub("\"", "\\\"", s, fixed = TRUE)
    s <- gsub("\n", "\\n", s, fixed = TRUE)
    s <- gsub("\r", "\\r", s, fixed = TRUE)
    s <- gsub("\t", "\\t", s, fixed = TRUE)
    m <- gregexpr("[\001-\037]", s)
    regmatches(s, m) <- lapply(regmatches(s, m), function(x) {
      sprintf("\\u%04x", vapply(x, utf8ToInt, 0L))
    })
    paste0("\"", s, "\"")
  }

  send <- function(text) {
    writeLines(text, events, useBytes = TRUE)
    flush(events)
  }

  flush_std <- function() {
    try(flush(stdout()), silent = TRUE)
    try(flush(stderr()), silent = TRUE)
  }

  errored <- FALSE
  report <- function(name, value, traceback = value) {
    if (errored) return(invisible())
    errored <<- TRUE
    flush_std()
    send(sprintf("{\"t\":\"error\",\"name\":%s,\"value\":%s,\"traceback\":%s}",
                 json(name), json(value), json(traceback)))
  }

  # The call a condition names, or NULL when it is the driver's own `eval` (a cell's
  # top-level `stop()` says "Error: boom", as at R's prompt).
  call_of <- function(cond) {
    call <- conditionCall(cond)
    if (is.call(call) && identical(call[[1]], quote(eval))) NULL else call
  }

  describe <- function(cond) {
    call <- call_of(cond)
    msg <- conditionMessage(cond)
    if (is.null(call)) sprintf("Error: %s", msg)
    else sprintf("Error in %s: %s", paste(deparse(call), collapse = "\n"), msg)
  }

  result <- function(value) {
    text <- tryCatch(
      paste(utils::capture.output(print(value)), collapse = "\n"),
      error = function(e) {
        cat(describe(e), "\n", file = stderr())
        NULL
      }
    )
    if (is.null(text)) return(invisible())
    flush_std()
    send(sprintf("{\"t\":\"result\",\"main\":false,\"data\":{\"text/plain\":%s}}", json(text)))
  }

  run <- function(code) {
    exprs <- tryCatch(parse(text = code, keep.source = FALSE), error = function(e) e)
    if (inherits(exprs, "error")) {
      report("ERROR", describe(exprs))
      return(invisible())
    }
    for (i in seq_along(exprs)) {
      # What one top-level expression prints reaches stdout in one write after it, as
      # IRkernel (through the evaluate package) sends it: R writes the pieces of a print()
      # separately, and the agent could read them as several chunks. Its value and its error
      # follow that output. Subprocesses write to the pipe directly, as they go.
      buf <- character(0)
      tc <- textConnection("buf", "w", local = TRUE)
      sink(tc)
      v <- NULL
      failure <- NULL
      tryCatch(
        withCallingHandlers(
          tryCatch({
            v <- withVisible(eval(exprs[[i]], envir = globalenv()))
          }, error = function(e) {
            failure <<- c("ERROR", describe(e))
          }, interrupt = function(e) {
            # IRkernel answers an interrupt with status "abort", which E2B's server turns
            # into this error.
            failure <<- c("ExecutionAborted", "Execution was aborted")
          }),
          warning = function(w) {
            call <- call_of(w)
            where <- if (is.null(call)) "" else paste0("In ", deparse(call)[[1]], ": ")
            cat(sprintf("Warning message:\n%s%s\n", where, conditionMessage(w)), file = stderr())
            invokeRestart("muffleWarning")
          }
        ),
        finally = {
          incomplete <- isIncomplete(tc)
          sink()
          close(tc)
          if (length(buf)) {
            cat(paste0(paste(buf, collapse = "\n"), if (incomplete) "" else "\n"))
            flush_std()
          }
        }
      )
      if (!is.null(failure)) {
        report(failure[[1]], failure[[2]])
        break
      }
      if (!is.null(v) && v$visible) result(v$value)
    }
  }

  read_field <- function(len) {
    if (len == 0) return("")
    x <- readChar(requests, len, useBytes = TRUE)
    Encoding(x) <- "UTF-8"
    x
  }

  send(sprintf("{\"t\":\"ready\",\"pid\":%d}", Sys.getpid()))
  repeat {
    # An interrupt that arrives after its cell has finished must not end the driver.
    header <- tryCatch(readLines(requests, n = 1, warn = FALSE),
                       interrupt = function(e) NA_character_)
    if (length(header) == 0) break
    if (is.na(header)) next
    lens <- as.integer(strsplit(header, " ", fixed = TRUE)[[1]])
    fields <- vapply(lens, read_field, "")
    code <- fields[[2]]
    env <- if (length(fields) > 2) fields[-(1:2)] else character(0)
    pairs <- seq_len(length(env) %/% 2)
    keys <- env[2 * pairs - 1]
    vals <- env[2 * pairs]
    old <- if (length(keys)) Sys.getenv(keys, unset = NA, names = TRUE) else character(0)
    errored <- FALSE
    tryCatch({
      if (length(keys)) do.call(Sys.setenv, as.list(stats::setNames(vals, keys)))
      run(code)
    }, interrupt = function(e) {
      report("ExecutionAborted", "Execution was aborted")
    }, finally = {
      for (k in keys) {
        if (is.na(old[[k]])) Sys.unsetenv(k)
        else do.call(Sys.setenv, stats::setNames(list(old[[k]]), k))
      }
      flush_std()
      send("{\"t\":\"done\"}")
    })
  }
  quit(save = "no", status = 0)
})

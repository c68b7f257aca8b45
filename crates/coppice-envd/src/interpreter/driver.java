// Coppice code-interpreter driver: one persistent Java context on JShell.
//
// The agent (coppice-envd) runs this file with the JDK's source launcher (`java driver.java`)
// and a unix stream socket as fd 0 (Java cannot open a descriptor by its number). A request
// is one line of space-separated byte lengths followed by that many fields: the cell
// number, the code, then the per-call env vars as name and value pairs. Events go back as
// JSON lines: ready, stream, result, error, done.
//
// Snippets run in this JVM (JShell's local execution engine). System.out and System.err
// are replaced by streams that send every write as a `stream` event, as IJava's kernel
// does (so `println` arrives as the text and then the line break). The sandbox's env vars
// are also system properties, and per-call env vars are set as system properties for one
// execution, as E2B's server does for Java. The value of a final expression is the main
// result, shown with `String.valueOf`. See docs/code-interpreter.md.

import java.io.BufferedInputStream;
import java.io.ByteArrayInputStream;
import java.io.FileDescriptor;
import java.io.FileInputStream;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.stream.Collectors;

import jdk.jshell.EvalException;
import jdk.jshell.ExpressionSnippet;
import jdk.jshell.JShell;
import jdk.jshell.JShellException;
import jdk.jshell.Snippet;
import jdk.jshell.SnippetEvent;
import jdk.jshell.SourceCodeAnalysis;
import jdk.jshell.UnresolvedReferenceException;
import jdk.jshell.VarSnippet;

class CoppiceDriver {
    private static final String RESULT_KEY = "coppice.driver.result";
    private static OutputStream channel;
    private static boolean errored;
    /** Set by SIGINT while a cell runs. */
    private static volatile boolean interrupted;

    static synchronized void send(String json) {
        try {
            channel.write((json + "\n").getBytes(StandardCharsets.UTF_8));
            channel.flush();
        } catch (IOException e) {
            // The agent is gone; so is the context.
            Runtime.getRuntime().halt(0);
        }
    }

    static String quote(String s) {
        StringBuilder b = new StringBuilder(s.length() + 2).append('"');
        for (int i = 0; i < s.length(); i++) {
            char c = s.charAt(i);
            switch (c) {
                case '"': b.append("\\\""); break;
                case '\\': b.append("\\\\"); break;
                case '\n': b.append("\\n"); break;
                case '\r': b.append("\\r"); break;
                case '\t': b.append("\\t"); break;
                default:
                    if (c < 0x20 || Character.isSurrogate(c) && !validSurrogate(s, i)) {
                        b.append(String.format("\\u%04x", c < 0x20 ? (int) c : 0xfffd));
                    } else {
                        b.append(c);
                    }
            }
        }
        return b.append('"').toString();
    }

    private static boolean validSurrogate(String s, int i) {
        char c = s.charAt(i);
        if (Character.isHighSurrogate(c)) {
            return i + 1 < s.length() && Character.isLowSurrogate(s.charAt(i + 1));
        }
        return i > 0 && Character.isHighSurrogate(s.charAt(i - 1));
    }

    /** A stream that sends each write as one `stream` event. */
    static final class Forward extends OutputStream {
        private final String name;

        Forward(String name) {
            this.name = name;
        }

        @Override
        public void write(int b) {
            write(new byte[] {(byte) b}, 0, 1);
        }

        @Override
        public void write(byte[] b, int off, int len) {
            if (len == 0) {
                return;
            }
            String text = new String(b, off, len, StandardCharsets.UTF_8);
            send("{\"t\":\"stream\",\"name\":\"" + name + "\",\"text\":" + quote(text) + "}");
        }
    }

    static void error(String name, String value, String traceback) {
        if (errored) {
            return;
        }
        errored = true;
        send("{\"t\":\"error\",\"name\":" + quote(name) + ",\"value\":" + quote(value)
                + ",\"traceback\":" + quote(traceback) + "}");
    }

    static void reportException(JShellException e) {
        String name;
        String value = e.getMessage() == null ? "" : e.getMessage();
        StringBuilder tb = new StringBuilder();
        if (e instanceof EvalException) {
            String cls = ((EvalException) e).getExceptionClassName();
            name = cls.substring(cls.lastIndexOf('.') + 1);
            tb.append(cls);
        } else if (e instanceof UnresolvedReferenceException) {
            name = "UnresolvedReferenceException";
            Snippet s = ((UnresolvedReferenceException) e).getSnippet();
            value = "Attempted to use a snippet with unresolved references: " + s.source().trim();
            tb.append(name);
        } else {
            name = e.getClass().getSimpleName();
            tb.append(name);
        }
        if (!value.isEmpty()) {
            tb.append(": ").append(value);
        }
        for (StackTraceElement el : e.getStackTrace()) {
            tb.append("\n\tat ").append(el);
        }
        error(name, value, tb.toString());
    }

    static byte[] readLine(InputStream in) throws IOException {
        java.io.ByteArrayOutputStream line = new java.io.ByteArrayOutputStream();
        int c;
        while ((c = in.read()) != '\n') {
            if (c < 0) {
                return null;
            }
            line.write(c);
        }
        return line.toByteArray();
    }

    static void run(JShell shell, String code) {
        SourceCodeAnalysis analysis = shell.sourceCodeAnalysis();
        String rest = code;
        String valueName = null;
        while (!rest.isBlank()) {
            SourceCodeAnalysis.CompletionInfo info = analysis.analyzeCompletion(rest);
            String source;
            if (info.completeness() == SourceCodeAnalysis.Completeness.EMPTY) {
                break;
            } else if (info.completeness().isComplete()) {
                source = info.source();
                rest = info.remaining();
            } else {
                // Incomplete or not Java: let JShell say what is wrong with it.
                source = rest;
                rest = "";
            }
            valueName = null;
            List<SnippetEvent> events = shell.eval(source);
            if (interrupted) {
                // What E2B's server says when a kernel aborts a cell.
                error("ExecutionAborted", "Execution was aborted", "");
                return;
            }
            for (SnippetEvent event : events) {
                if (event.causeSnippet() != null) {
                    continue;
                }
                Snippet snippet = event.snippet();
                if (event.status() == Snippet.Status.REJECTED) {
                    String messages = shell.diagnostics(snippet)
                            .map(d -> d.getMessage(Locale.ROOT))
                            .collect(Collectors.joining("\n"));
                    String where = snippet.source().trim();
                    error("CompilationException", messages, messages + "\n" + where);
                    return;
                }
                if (event.exception() != null) {
                    reportException(event.exception());
                    return;
                }
                if (event.value() == null) {
                    continue;
                }
                if (snippet instanceof ExpressionSnippet) {
                    valueName = ((ExpressionSnippet) snippet).name();
                } else if (snippet instanceof VarSnippet
                        && snippet.subKind() == Snippet.SubKind.TEMP_VAR_EXPRESSION_SUBKIND) {
                    valueName = ((VarSnippet) snippet).name();
                }
            }
        }
        if (valueName == null) {
            return;
        }
        // The snippet's value as an object, not JShell's Java-literal rendering of it: the
        // system properties are shared with the snippets, which run in this JVM.
        // A block is a statement, so this makes no `$n` variable of its own.
        for (SnippetEvent e : shell.eval(
                "{ System.getProperties().put(\"" + RESULT_KEY + "\", (Object) " + valueName + "); }")) {
            shell.drop(e.snippet());
        }
        Object value = System.getProperties().remove(RESULT_KEY);
        if (value != null) {
            String text = String.valueOf(value);
            send("{\"t\":\"result\",\"main\":true,\"data\":{\"text/plain\":" + quote(text) + "}}");
        }
    }

    public static void main(String[] args) throws Exception {
        InputStream requests = new BufferedInputStream(new FileInputStream(FileDescriptor.in));
        channel = new FileOutputStream(FileDescriptor.in);
        System.setIn(new ByteArrayInputStream(new byte[0]));
        // An anonymous subclass: PrintStream's own println writes text and line break at once.
        PrintStream out = new PrintStream(new Forward("stdout"), true, StandardCharsets.UTF_8) { };
        PrintStream err = new PrintStream(new Forward("stderr"), true, StandardCharsets.UTF_8) { };
        System.setOut(out);
        System.setErr(err);
        for (Map.Entry<String, String> e : System.getenv().entrySet()) {
            if (System.getProperty(e.getKey()) == null) {
                System.setProperty(e.getKey(), e.getValue());
            }
        }
        JShell shell = JShell.builder().executionEngine("local").out(out).err(err).build();
        // Compile something once now, so the first cell does not pay for warming javac up.
        for (SnippetEvent warm : shell.eval("int $coppiceWarm = 0;")) {
            shell.drop(warm.snippet());
        }
        try {
            sun.misc.Signal.handle(new sun.misc.Signal("INT"), s -> {
                interrupted = true;
                shell.stop();
            });
        } catch (Throwable t) {
            // Without the handler, an interrupt ends the context; the agent restarts it.
        }
        send("{\"t\":\"ready\",\"pid\":" + ProcessHandle.current().pid() + "}");
        while (true) {
            byte[] header = readLine(requests);
            if (header == null) {
                break;
            }
            String[] parts = new String(header, StandardCharsets.US_ASCII).trim().split(" ");
            List<String> fields = new ArrayList<>();
            for (String p : parts) {
                byte[] field = requests.readNBytes(Integer.parseInt(p));
                fields.add(new String(field, StandardCharsets.UTF_8));
            }
            String code = fields.get(1);
            Map<String, String> saved = new HashMap<>();
            for (int i = 2; i + 1 < fields.size(); i += 2) {
                String key = fields.get(i);
                saved.put(key, System.getProperty(key));
                System.setProperty(key, fields.get(i + 1));
            }
            errored = false;
            interrupted = false;
            try {
                run(shell, code);
            } catch (Throwable t) {
                error(t.getClass().getSimpleName(), String.valueOf(t.getMessage()), t.toString());
            } finally {
                for (Map.Entry<String, String> e : saved.entrySet()) {
                    if (e.getValue() == null) {
                        System.clearProperty(e.getKey());
                    } else {
                        System.setProperty(e.getKey(), e.getValue());
                    }
                }
            }
            out.flush();
            err.flush();
            send("{\"t\":\"done\"}");
        }
        Runtime.getRuntime().halt(0);
    }
}

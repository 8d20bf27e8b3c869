// The servlet of the differential tests: one class mapped several times in web.xml (the
// init-param "resource" names what a mapping serves), reading the path and the identity
// headers through the servlet API. Tomcat keeps "-" and "_" header names apart, so both
// spellings are reported.
package probe;

import jakarta.servlet.http.HttpServlet;
import jakarta.servlet.http.HttpServletRequest;
import jakarta.servlet.http.HttpServletResponse;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.util.Collections;
import java.util.List;

public class Probe extends HttpServlet {
    static final String[] HEADERS = {
        "x-client-spiffe-id", "x-forwarded-client-cert", "client-cert", "x-forwarded-for",
        "x-forwarded-host", "forwarded", "x-original-url", "x-rewrite-url", "x-real-ip",
        "x-http-method-override",
    };

    @Override
    protected void doGet(HttpServletRequest req, HttpServletResponse resp) throws IOException {
        answer(req, resp, getInitParameter("resource"));
    }

    @Override
    protected void doPost(HttpServletRequest req, HttpServletResponse resp) throws IOException {
        answer(req, resp, getInitParameter("resource"));
    }

    @Override
    protected void doPut(HttpServletRequest req, HttpServletResponse resp) throws IOException {
        answer(req, resp, getInitParameter("resource"));
    }

    @Override
    protected void doDelete(HttpServletRequest req, HttpServletResponse resp) throws IOException {
        answer(req, resp, getInitParameter("resource"));
    }

    static void answer(HttpServletRequest req, HttpServletResponse resp, String resource)
            throws IOException {
        req.getInputStream().readAllBytes();
        StringBuilder out = new StringBuilder("{\"server\": \"tomcat\"");
        field(out, "resource", resource);
        field(out, "method", req.getMethod());
        String info = req.getPathInfo();
        field(out, "path", req.getServletPath() + (info == null ? "" : info));
        field(out, "servlet_path", req.getServletPath());
        field(out, "path_info", info);
        field(out, "request_uri", req.getRequestURI());
        field(out, "host", req.getServerName());
        out.append(", \"headers\": {");
        boolean first = true;
        for (String name : HEADERS) {
            for (String spelling : new String[] {name, name.replace('-', '_')}) {
                if (!first) out.append(", ");
                first = false;
                out.append(quote(spelling)).append(": [");
                List<String> values = Collections.list(req.getHeaders(spelling));
                for (int i = 0; i < values.size(); i++) {
                    if (i > 0) out.append(", ");
                    out.append(quote(values.get(i)));
                }
                out.append("]");
            }
        }
        out.append("}}");
        byte[] body = out.toString().getBytes(StandardCharsets.UTF_8);
        resp.setContentType("application/json");
        resp.setContentLength(body.length);
        resp.getOutputStream().write(body);
    }

    static void field(StringBuilder out, String name, String value) {
        out.append(", ").append(quote(name)).append(": ");
        out.append(value == null ? "null" : quote(value));
    }

    static String quote(String s) {
        StringBuilder q = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            if (c == '"' || c == '\\') q.append('\\').append(c);
            else if (c < 0x20 || c > 0x7e) q.append(String.format("\\u%04x", (int) c));
            else q.append(c);
        }
        return q.append('"').toString();
    }
}

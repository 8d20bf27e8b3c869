// POST-only: HttpServlet answers 405 to every other method it knows, and 501 to a method
// it does not know (a lower-case "post" is not POST to the servlet API).
package probe;

import jakarta.servlet.http.HttpServlet;
import jakarta.servlet.http.HttpServletRequest;
import jakarta.servlet.http.HttpServletResponse;
import java.io.IOException;

public class InvoicesPost extends HttpServlet {
    @Override
    protected void doPost(HttpServletRequest req, HttpServletResponse resp) throws IOException {
        Probe.answer(req, resp, "invoices-post");
    }
}

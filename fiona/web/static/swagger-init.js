// /docs: Swagger UI on this server's OpenAPI description (a file, so the CSP needs no inline script).
window.ui = SwaggerUIBundle({url: '/openapi.json', dom_id: '#swagger-ui', deepLinking: true,
  presets: [SwaggerUIBundle.presets.apis], layout: 'BaseLayout'});
